"""Tiny real transformers models with a planted super weight, and a byte-level tokenizer for them."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from superweights.compression.evaluation import EvalText

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
    return _planted_llama(layer, row, {col: value}, seed)


@torch.no_grad()
def planted_spread_llama(layer: int = 1, row: int = 17, cols: tuple[int, ...] = tuple(range(100, 116)),
                         total: float = 50.0, seed: int = 0) -> LlamaForCausalLM:
    """The same massive activation in hidden channel `row`, but no single weight carries it: each of the
    intermediate channels `cols` fires and writes total / len(cols) of it (like the 1.5B Qwen2.5 model whose
    strongest feeding weight carries a third of its activation)."""
    return _planted_llama(layer, row, {col: total / len(cols) for col in cols}, seed)


def _planted_llama(layer: int, row: int, values: dict[int, float], seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    v = _shared_direction(seed)
    model.model.embed_tokens.weight += 3.0 * v
    mlp = model.model.layers[layer].mlp
    for col, value in values.items():
        mlp.gate_proj.weight[col] = 0.5 * v  # normalized inputs are about 8 v: the channel fires at about 4
        mlp.up_proj.weight[col] = 0.5 * v
        mlp.down_proj.weight[row, col] = value
    model.lm_head.weight[:, row] = 3.0 * torch.randn(VOCAB)
    return model


@torch.no_grad()
def servable_planted_llama(english: str, layer: int = 1, row: int = 17, col: int = 99, value: float = 50.0,
                           seed: int = 0) -> LlamaForCausalLM:
    """A planted Llama that vLLM's CPU engine serves, at tensor parallel size 2 too (head_dim 64, 4 heads, 2 KV
    heads, 2048 positions), with byte_level_tokenizer(), and whose super weight matters on English text: its LM
    head reads hidden channel `row` as the log-frequencies of the tokens of `english`, so with the super activation
    the model predicts English bytes (perplexity near their unigram entropy) and without it almost uniformly
    (about 256).

    After the final RMSNorm the super activation makes the hidden state nearly one-hot in `row`, about
    sqrt(hidden) there: the LM head's column is scaled by that."""
    torch.manual_seed(seed)
    hidden = 256
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=512, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=g)
    v /= v.norm()
    model.model.embed_tokens.weight += 3.0 * v
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight[col] = 0.5 * v * (hidden / HIDDEN) ** 0.5  # RMSNorm scales inputs by sqrt(hidden)
    mlp.up_proj.weight[col] = 0.5 * v * (hidden / HIDDEN) ** 0.5
    mlp.down_proj.weight[row, col] = value
    ids = byte_level_tokenizer()(english, add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(ids), minlength=VOCAB).float() + 0.5
    log_p = counts.log() - counts.log().mean()
    model.lm_head.weight[:, row] = log_p / hidden**0.5
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
    out = model(input_ids=ids, use_cache=True)
    for _ in range(n_tokens - 1):
        probs = out.logits[0, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)[None]], dim=1)
        out = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)  # one new token
    return EvalText(name="samples", sha256="", ids=ids[0])


def byte_level_tokenizer():
    """A real byte-level tokenizer (transformers' fast tokenizer): 256 ids, one per byte, in the order of the
    byte-level alphabet (so an id is not the byte's value)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def save_checkpoint(model, directory) -> None:
    """A loadable checkpoint directory: the model plus the byte-level tokenizer."""
    model.save_pretrained(directory, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(directory)


def bos_tokenizer(add_bos: bool = True):
    """A real word-level tokenizer (transformers' fast tokenizer) that starts every sequence with "<s>" (id 0) when
    add_bos, as Llama's, Mistral's and Gemma's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "the", "The", ".", ",", "and", "of", "a", "to", "in", "is", "that", "it", ";",
             ":", "whale", "sea", "Ishmael"]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   add_bos_token=add_bos)


def write_tiny_gguf(path, add_bos: bool, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> None:
    """A tiny Llama GGUF (float32, random weights) with a byte-level tokenizer whose metadata says
    `tokenizer.ggml.add_bos_token = add_bos`, as llama.cpp writes it for Llama models."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    tokens = ["<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "\u0120a"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 4)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # 3: control
    writer.add_token_merges(["\u0120 a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    rng = np.random.default_rng(0)

    def tensor(*shape: int):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    writer.add_tensor("token_embd.weight", tensor(len(tokens), hidden))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (intermediate, hidden)),
                            ("ffn_up", (intermediate, hidden)), ("ffn_down", (hidden, intermediate))):
            writer.add_tensor(f"blk.{i}.{name}.weight", tensor(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", tensor(len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
