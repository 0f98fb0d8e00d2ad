"""superweights: an LLM inference server that knows its model's super weights.

One import namespace for everything the distribution installs:
- superweights.compression: model sources, detection, quantization, artifacts, the vLLM plugin (folder compression/)
- superweights.server: the gRPC server over vLLM, its CLI and client (folder server/)
- superweights.v1: the code generated from proto/ by scripts/codegen.sh (never edited, not committed)

pyproject.toml's package-dir maps the repository's top-level folders into this namespace when it is installed.
"""

__version__ = "0.2.0"  # the one place the version is written; pyproject.toml reads it from here


def _source_checkout() -> None:
    """In a source checkout used without installing it (`PYTHONPATH=.`, as on the GPU machine), the mapped folders
    sit beside this one: look for subpackages there too. An installed copy has no pyproject.toml beside it."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isfile(os.path.join(root, "server", "cli.py")):
        __path__.append(root)


_source_checkout()
