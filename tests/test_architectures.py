"""Down-projection discovery by module structure, on tiny real models of each family."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
)

from superweights.compression.architectures import NoDownProjectionError, find_down_projections

SMALL = dict(vocab_size=128, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)


def build(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config, expected", [
    (LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **SMALL), "model.layers.{}.mlp.down_proj"),
    (MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **SMALL), "model.layers.{}.mlp.down_proj"),
    (Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **SMALL), "model.layers.{}.mlp.down_proj"),
    (Phi3Config(hidden_size=32, intermediate_size=64, num_key_value_heads=4, pad_token_id=0, **SMALL),
     "model.layers.{}.mlp.down_proj"),
    (Olmo2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=4, pad_token_id=0, **SMALL),
     "model.layers.{}.mlp.down_proj"),
    (Gemma2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=16, **SMALL),
     "model.layers.{}.mlp.down_proj"),
    (GPTNeoXConfig(hidden_size=32, intermediate_size=64, **SMALL), "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    (FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=128),
     "transformer.h.{}.mlp.dense_4h_to_h"),
])
def test_finds_one_down_projection_per_layer(config, expected):
    found = find_down_projections(build(config))
    assert [(d.layer, d.name) for d in found] == [(i, expected.format(i)) for i in range(3)]
    assert all(d.weight_matrix().shape == (32, d.weight_matrix().shape[1]) for d in found)
    assert all(d.weight_matrix().shape[1] > 32 for d in found)


def test_gpt2_conv1d_is_read_transposed():
    model = build(GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    found = find_down_projections(model)
    assert [d.name for d in found] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    d = found[1]
    assert d.transposed and d.weight_matrix().shape == (32, 64)
    d.set(5, 40, 123.0)
    assert model.transformer.h[1].mlp.c_proj.weight[40, 5] == 123.0
    assert d.get(5, 40) == 123.0


def test_gemma_wide_attention_output_is_not_a_down_projection():
    # Gemma-7B style: heads * head_dim > hidden, so o_proj also maps a wider space to hidden.
    model = build(Gemma2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=32, **SMALL))
    assert all("mlp" in d.name for d in find_down_projections(model))


def test_model_without_down_projection_names_what_was_looked_for():
    model = build(GPT2Config(n_embd=32, n_inner=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    with pytest.raises(NoDownProjectionError, match=r"hidden_size=32.*mlp\.down_proj"):
        find_down_projections(model)
