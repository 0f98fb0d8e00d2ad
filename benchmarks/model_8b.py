"""An 8B-shaped model directory without 16 GB of weights: Llama-3-8B's architecture, a tokenizer we have.

    python -m benchmarks.model_8b TOKENIZER_DIR OUT_DIR

TOKENIZER_DIR is a Hugging Face checkpoint directory whose tokenizer the model takes (the converted
Qwen2.5-Coder-0.5B: vocabulary 151,936; or the default model's, whose directory `superweights model prepare`
prints: 49,152). vocab_size is set to match it: the checkpoint's own config.json vocab_size where there is one
(Qwen pads its embedding past the tokenizer's 151,665 ids), else the tokenizer's length. OUT_DIR gets config.json
and the tokenizer files only (a few MB), and is served with vLLM's `load_format=dummy`: random weights, real
throughput; quality figures need real weights. The super weights are declared from the published coordinates of
Meta-Llama-3-8B (compression/data/published_super_weights.json), not detected: dummy weights have none.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# Meta-Llama-3-8B's config.json, less its vocabulary and special-token ids, which follow the tokenizer.
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
             "initializer_range": 0.02, "dtype": "bfloat16"}
PUBLISHED_ENTRY = "meta-llama-3-8b"
# Files a tokenizer may have; generation_config.json is left out on purpose: vLLM's OpenAI server takes its
# sampling defaults (Qwen's repetition_penalty 1.05 among them) and the other arms do not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def declared_super_weights() -> str:
    """Meta-Llama-3-8B's published super weights in the --super-weights form, e.g. "1:788:2427,..."."""
    from superweights.compression.published import load_directory

    entry = next(e for e in load_directory() if e.id == PUBLISHED_ENTRY)
    return ",".join(f"{c.layer}:{c.row}:{c.col}" for c in entry.coordinates)


def vocab_size(tokenizer_dir: Path, tokenizer) -> int:
    """The source checkpoint's embedding rows where its config says, else the tokenizer's length."""
    config = tokenizer_dir / "config.json"
    declared = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    return max(int(declared or 0), len(tokenizer))


def make_model_dir(tokenizer_dir: Path, out: Path) -> Path:
    """Write OUT/config.json (Llama-3-8B's shape) and the tokenizer's files; returns OUT."""
    from transformers import AutoTokenizer

    tokenizer_dir, out = Path(tokenizer_dir).expanduser(), Path(out).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    for name in copied:
        shutil.copy(tokenizer_dir / name, out / name)
    eos = tokenizer.eos_token_id
    config = {**LLAMA3_8B, "vocab_size": vocab_size(tokenizer_dir, tokenizer),
              "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
              "eos_token_id": eos, "_name_or_path": f"llama-3-8b-shape ({tokenizer_dir.name} tokenizer)"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer_dir", type=Path, help="checkpoint directory whose tokenizer the model takes")
    parser.add_argument("out", type=Path, help="model directory to write (config.json + tokenizer files)")
    args = parser.parse_args()
    out = make_model_dir(args.tokenizer_dir, args.out)
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out}: vocab_size {config['vocab_size']}, declared super weights {declared_super_weights()}")


if __name__ == "__main__":
    main()
