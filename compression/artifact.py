"""Compressed artifacts: a compressed-tensors checkpoint that keeps its super weights, plus what serves it.

    DIR/config.json               quantization_config: compressed-tensors, quant_method "superweights"
    DIR/model.safetensors         quantized Linear weights (+ scales), dense embeddings/norms, and per protected
                                  module `sw_column_weight` [out, k]: its super-weight columns in float32
    DIR/tokenizer*, generation_config.json
    DIR/report.json               the detection report of the source model
    DIR/adapters/<variant>/       PEFT adapters: no_super_weights, no_super_weight_<i> (vllm --lora-modules)
    DIR/evaluation.json           offline quality of this artifact (what the server's self-check holds it to)
    DIR/manifest.json             sha256 of every file above; a mismatch refuses the artifact

Protection: no compressed-tensors layout holds one float at an arbitrary position, so a protected module's
super-weight columns are zeroed before quantization (held out of every scale) and stored dense; the vLLM plugin
(compression.vllm_plugin) computes y = Q(x with those channels zeroed) + x[:, cols] @ W[:, cols]^T. The super
weights are exact and the super activation, which enters through those input channels, skips activation
quantization.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapters import write_adapter
from .errors import UserError
from .format import (
    ADAPTERS,
    ARTIFACT_SCHEMA,
    COLUMN_WEIGHT,
    EXTRA_KEY,
    IGNORE,
    QUANT_METHOD,
    protected_columns,
    variant_specs,
)
from .fsutil import replacing_dir
from .models import Checkpoint, load_model, offline_placement, sha256_file
from .quantize import group_thresholds, held_out_channels, quantized_linears
from .report import SuperWeightReport
from .schemes import Scheme, fit_to_model, get_scheme

log = logging.getLogger(__name__)
# Activation quantization turns float rounding differences into rounding flips: on 1024 tokens float32 and
# float64 evaluations of one w8a8 artifact differed by 1%, on 4096 by 0.04%. Artifacts are measured on 4096.
ARTIFACT_EVAL_TOKENS = 4096


class ArtifactError(UserError):
    """An artifact directory that cannot be used as it is; the message names the file."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    scheme: Scheme
    report: SuperWeightReport
    manifest: dict
    evaluation: dict

    @property
    def checkpoint(self) -> Checkpoint:
        source = self.manifest["source"]
        return Checkpoint(path=self.path, name=f"{source['name']} {self.scheme.label}", source=str(self.path),
                          sha256=sha256_file(self.path / "manifest.json"))

    @property
    def served_report(self) -> SuperWeightReport:
        """The source report with its evaluation replaced by the artifact's own: what the server self-checks."""
        e = self.evaluation
        removed_ratio = e["removed_perplexity"] / e["perplexity"] if self.report.super_weights else None
        evaluation = dataclasses.replace(self.report.evaluation, baseline_perplexity=e["perplexity"],
                                         removed_perplexity=e["removed_perplexity"], removed_ratio=removed_ratio,
                                         tokens=e["tokens"], window=e["window"])
        model = dataclasses.replace(self.report.model, artifact=str(self.path), scheme=self.scheme.label,
                                    protected=self.scheme.weights.protect)
        return dataclasses.replace(self.report, evaluation=evaluation, model=model)


def is_artifact(path: str | Path | None) -> bool:
    return path not in (None, "", "default") and (Path(path) / "manifest.json").is_file()


def _compressor(scheme: Scheme):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(scheme.compression_format)


def _scales(w: torch.Tensor, scheme: Scheme, cols: list[int]) -> torch.Tensor:
    """compressed-tensors weight_scale for w [out, in]: [out, 1] per channel, [out, in / g] per group."""
    keep = torch.ones_like(w)
    keep[:, cols] = 0.0  # the protected columns are stored dense: held out of every scale
    t = group_thresholds(w, scheme.weights, keep)  # [G, 1]
    scale = (t / scheme.weights.qmax).clamp_min(1e-12)
    return scale.reshape(w.shape[0], -1)


@torch.no_grad()
def compress_linear(w: torch.Tensor, scheme: Scheme, cols: list[int]) -> dict[str, torch.Tensor]:
    """One Linear's compressed-tensors tensors (local names), its protected columns zeroed and kept dense.

    Args:
        w: [out, in] float weight.
        cols: input channels held out (the columns of its super weights); empty for most modules.
    """
    w32 = w.detach().float().clone()
    dense = w32[:, cols].clone() if cols else None
    if cols:
        w32[:, cols] = 0.0
    state = {"weight": w32, "weight_scale": _scales(w32, scheme, cols)}
    out = dict(_compressor(scheme).compress(state, scheme.compressed_tensors_scheme()))
    if dense is not None:
        out[COLUMN_WEIGHT] = dense.contiguous()  # [out, k] float32: the super weights, exactly
    return out


@torch.no_grad()
def decompress_linear(tensors: dict[str, torch.Tensor], scheme: Scheme, cols: list[int]) -> torch.Tensor:
    """The float weight [out, in] vLLM computes with: dequantized, protected columns from the dense copy."""
    state = {k: v for k, v in tensors.items() if k != COLUMN_WEIGHT}
    w = _compressor(scheme).decompress(state, scheme.compressed_tensors_scheme())["weight"].float()
    if cols:
        w[:, cols] = tensors[COLUMN_WEIGHT].float()
    return w


def quantization_config(scheme: Scheme, protected: dict[str, list[int]]) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": scheme.compressed_tensors_scheme()},
                                format=scheme.compression_format, ignore=list(IGNORE),
                                quantization_status="compressed").model_dump(mode="json", exclude_none=True)
    config["quant_method"] = QUANT_METHOD  # served through compression.vllm_plugin; plain vLLM refuses it
    config[EXTRA_KEY] = {"scheme": scheme.name, "protected_columns": protected,
                         "weight_protect": scheme.weights.protect, "clip": scheme.weights.clip,
                         "clip_value": scheme.weights.clip_value}
    return config


def compress(checkpoint: Checkpoint, report: SuperWeightReport, scheme: Scheme, out: Path,
             progress: bool = True, eval_tokens: int | None = None, device: str = "auto",
             dtype: str = "auto") -> Artifact:
    """Write an artifact of `checkpoint` quantized with `scheme` to `out` (replaced atomically).

    Args:
        report: the checkpoint's super-weight report; its super weights are protected when scheme.weights.protect.
        eval_tokens: tokens of the evaluation text measured into evaluation.json (default 4096).
        device, dtype: where the model is loaded, quantized and evaluated (models.offline_placement); the
            unquantized tensors (embeddings, norms) are stored in that dtype.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if not scheme.servable:
        scheme.compressed_tensors_scheme()  # raises with the list of servable schemes
    out = Path(out).expanduser().resolve()
    if out.exists() and not is_artifact(out) and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not a superweights artifact: give an empty or new directory")
    device, dtype = offline_placement(device, dtype)
    model, tokenizer = load_model(checkpoint, device=device, dtype=dtype)
    protected = held_out_channels(report) if scheme.weights.protect else {}
    linears = quantized_linears(model)
    scheme = fit_to_model(scheme, [m.in_features for m in linears.values()])
    tensors: dict[str, torch.Tensor] = {}
    for name, module in tqdm(linears.items(), desc=f"compress {scheme.name}", unit="linear", disable=not progress):
        for key, value in compress_linear(module.weight, scheme, protected.get(name, [])).items():
            tensors[f"{name}.{key}"] = value.cpu().contiguous()
    quantized = {f"{n}.weight" for n in linears}
    for key, value in model.state_dict().items():
        if key not in quantized and key not in tensors:
            tensors[key] = value.cpu().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    del model  # the artifact is evaluated from what was written, not from this model
    with replacing_dir(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((checkpoint.path / "config.json").read_text())
        config["quantization_config"] = quantization_config(scheme, protected)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for extra in checkpoint.path.iterdir():
            if extra.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                shutil.copy2(extra, tmp / extra.name)
        (tmp / "report.json").write_text(report.to_json())
        for spec in variant_specs(report):
            write_adapter(report, tmp / ADAPTERS / spec.name, alpha=spec.alpha, weights=list(spec.weights),
                          base_model=str(out))
        evaluation = evaluate_artifact_dir(tmp, scheme, report, tokenizer, eval_tokens, device=device, dtype=dtype)
        for path in tmp.rglob("*"):  # readable by whoever serves it, whatever the source files' modes
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        (tmp / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
        write_manifest(tmp, scheme, report, checkpoint)
    return open_artifact(out)


def write_manifest(root: Path, scheme: Scheme, report: SuperWeightReport, checkpoint: Checkpoint) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {"schema": ARTIFACT_SCHEMA, "scheme": scheme.name, "scheme_config": {
                    "weights": asdict(scheme.weights),
                    "activations": asdict(scheme.activations) if scheme.activations else None},
                "source": {"name": checkpoint.name, "source": checkpoint.source, "sha256": checkpoint.sha256},
                "super_weights": len(report.super_weights),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {str(p.relative_to(root)): sha256_file(p) for p in files}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def verify_artifact(root: Path) -> dict:
    """Check every file against the manifest; raise ArtifactError naming the first file that differs."""
    root = Path(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {root / 'manifest.json'}: {e}") from e
    if manifest.get("schema") != ARTIFACT_SCHEMA:
        raise ArtifactError(f"{root / 'manifest.json'} is not a {ARTIFACT_SCHEMA} manifest")
    for rel, expected in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing (listed in manifest.json); recreate the "
                                f"artifact with `superweights compress`")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"artifact file {path} is corrupted: sha256 {actual[:16]}... does not match the "
                                f"manifest's {expected[:16]}...; recreate the artifact with `superweights compress`")
    return manifest


def open_artifact(root: str | Path) -> Artifact:
    """A verified artifact: its scheme, the source's report and the artifact's own offline evaluation."""
    root = Path(root).expanduser().resolve()
    manifest = verify_artifact(root)
    base = get_scheme(manifest["scheme"])
    weights = manifest["scheme_config"]["weights"]
    scheme = base.variant(protect=weights["protect"], clip=weights["clip"], clip_value=weights["clip_value"])
    scheme = dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=weights["group_size"],
                                                                     block_size=weights["block_size"]))
    try:
        report = SuperWeightReport.load(root / "report.json")
    except ValueError as e:
        raise ArtifactError(f"cannot read {root / 'report.json'}: {e}; recreate the artifact with `superweights "
                            f"compress`") from e
    evaluation = json.loads((root / "evaluation.json").read_text())
    return Artifact(path=root, scheme=scheme, report=report, manifest=manifest, evaluation=evaluation)


def artifact_adapters(artifact: Artifact) -> dict[str, Path]:
    """Variant name -> the artifact's own adapter directory, for each of its variants that its manifest lists
    (open_artifact verified those files)."""
    listed = artifact.manifest["files"]
    files = ("adapter_config.json", "adapter_model.safetensors")
    return {spec.name: artifact.path / ADAPTERS / spec.name for spec in variant_specs(artifact.report)
            if all(f"{ADAPTERS}/{spec.name}/{f}" in listed for f in files)}


@torch.no_grad()
def load_artifact_model(root: Path, scheme: Scheme, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The artifact as a transformers model computing what vLLM computes: dequantized weights, protected
    columns dense; returns (model, quantized module names, held-out channels) for quantize_activations."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(root)
    config = AutoConfig.from_pretrained(root)
    quant = config.quantization_config
    del config.quantization_config
    protected = protected_columns(quant)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tensors = load_file(root / "model.safetensors")
    modules = list(quantized_linears(model))
    state = {}
    for name in modules:
        local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")
                 and "." not in k.removeprefix(f"{name}.") and k != f"{name}.bias"}  # a bias stays as it is
        state[f"{name}.weight"] = decompress_linear(local, scheme, protected.get(name, [])).to(dtype)
        for k in local:
            tensors.pop(f"{name}.{k}")
    state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ArtifactError(f"{root / 'model.safetensors'} does not fit its config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device), modules, protected


def evaluate_artifact_dir(root: Path, scheme: Scheme, report: SuperWeightReport, tokenizer,
                          eval_tokens: int | None = None, window: int | None = None, device: str = "auto",
                          dtype: str = "auto") -> dict:
    """Offline quality of an artifact (weights as stored, activations quantized as vLLM does), and with its
    super weights removed: the numbers the served artifact must reproduce (device, dtype: offline_placement)."""
    from .evaluation import evaluate, load_eval_text, stop_word_ids
    from .quantize import quantize_activations

    tokens = eval_tokens or ARTIFACT_EVAL_TOKENS
    window = window or report.evaluation.window
    text = load_eval_text(tokenizer)
    ids = text.ids[:tokens]
    stop_ids = stop_word_ids(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"])
    device, dtype = offline_placement(device, dtype)
    model, modules, protected = load_artifact_model(root, scheme, getattr(torch, dtype), device)
    results = {}
    for arm in ("base", "removed"):
        if arm == "removed":
            if not report.super_weights:
                break
            by_name = dict(model.named_modules())
            with torch.no_grad():
                for w in report.super_weights:
                    by_name[w.module].weight[w.row, w.col] = 0.0
        if scheme.activations:
            with quantize_activations(model, scheme.activations, modules, protected):
                results[arm] = evaluate(model, ids, window=window, stop_ids=stop_ids, bos_id=text.bos_id)
        else:
            results[arm] = evaluate(model, ids, window=window, stop_ids=stop_ids, bos_id=text.bos_id)
        log.info("artifact %s: perplexity %.3f (%s)", scheme.label, results[arm].perplexity, arm)
    base = results["base"]
    return {"scheme": scheme.label, "tokens": int(ids.numel()), "window": window, "device": device, "dtype": dtype,
            "perplexity": base.perplexity,
            "next_token_accuracy": base.next_token_accuracy, "stop_word_mass": base.stop_word_mass,
            "removed_perplexity": results["removed"].perplexity if "removed" in results else base.perplexity}
