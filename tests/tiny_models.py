"""Tiny real transformers models with a planted super weight, and a byte-level tokenizer for them."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from compression.evaluation import EvalText

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 64, 256, 4, 256


class ByteTokenizer:
    """UTF-8 bytes as token ids: enough of the tokenizer interface for detection on a 256-token vocabulary."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def _shared_direction(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(HIDDEN, generator=g)
    return v / v.norm()


@torch.no_grad()
def planted_llama(layer: int = 1, row: int = 17, col: int = 99, value: float = 50.0, seed: int = 0) -> LlamaForCausalLM:
    """A 4-layer Llama whose `model.layers.{layer}.mlp.down_proj.weight[row, col]` is a super weight.

    Every token embedding shares a direction v; the gate and up rows `col` of that layer read v, so the
    intermediate channel `col` fires on every token, and the planted weight writes it, amplified, into hidden
    channel `row`. The LM head reads channel `row` strongly, so the model depends on it.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    v = _shared_direction(seed)
    model.model.embed_tokens.weight += 3.0 * v
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight[col] = 0.5 * v  # normalized inputs are about 8 v: the channel fires at about 4
    mlp.up_proj.weight[col] = 0.5 * v
    mlp.down_proj.weight[row, col] = value
    model.lm_head.weight[:, row] = 3.0 * torch.randn(VOCAB)
    return model


@torch.no_grad()
def planted_gpt2(layer: int = 1, row: int = 17, col: int = 99, value: float = 50.0, seed: int = 0) -> GPT2LMHeadModel:
    """The same construction in GPT-2's shape: Conv1D weights stored [in, out], so the planted entry of
    `transformer.h.{layer}.mlp.c_proj.weight` is [col, row]."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=4,
                        n_positions=512, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    v = _shared_direction(seed)
    model.transformer.wte.weight += 3.0 * v
    mlp = model.transformer.h[layer].mlp
    mlp.c_fc.weight[:, col] = 0.5 * v
    mlp.c_proj.weight[col, row] = value
    model.lm_head.weight[:, row] = 3.0 * torch.randn(VOCAB)
    return model


@torch.no_grad()
def sampled_text(model, n_tokens: int = 512, seed: int = 0) -> EvalText:
    """Text sampled from the intact model itself: the text it finds most likely, so any weight whose removal
    changes its predictions raises perplexity on it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, 1), generator=g)
    for _ in range(n_tokens - 1):
        probs = model(input_ids=ids).logits[0, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)[None]], dim=1)
    return EvalText(name="samples", sha256="", ids=ids[0])


def save_checkpoint(model, directory) -> None:
    """A loadable checkpoint directory: the model plus a byte-level tokenizer (256 ids, one per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    model.save_pretrained(directory, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)
