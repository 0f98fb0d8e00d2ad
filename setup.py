"""The build's one step beyond pyproject.toml: the gRPC code (superweights.v1) is generated from proto/ by
scripts/codegen.py in every build, so `pip install .`, `pip wheel .` and an sdist work from a clean tree (the
generated files are not committed). grpcio-tools is a build requirement (pyproject.toml)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from codegen import generate  # noqa: E402


class BuildPy(build_py):
    """The packages, then superweights/v1 generated into the build (an editable install uses the checkout's,
    from scripts/codegen.sh)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            generate(Path(self.build_lib))


class Sdist(sdist):
    """The sdist carries the generated code too, for installers that build from it without grpcio-tools."""

    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        generate(Path(base_dir))


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
