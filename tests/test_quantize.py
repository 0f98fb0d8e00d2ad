"""Round-to-nearest quantization math on small tensors, with super weights held out."""

import pytest
import torch

from superweights.compression.errors import UserError
from superweights.compression.quantize import (
    ActivationConfig,
    RTNConfig,
    clip_threshold,
    protected_entries,
    quantize_activation,
    quantize_activations,
    quantize_model,
    quantize_tensor,
)


def small(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 64, generator=g) * 0.02


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "block"])
@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_within_half_a_step(granularity, bits):
    w = small()
    config = RTNConfig(bits=bits, granularity=granularity, group_size=16, block_size=48)
    q = quantize_tensor(w, config)
    # the largest step of any group bounds the error: absmax / qmax / 2
    assert (q - w).abs().max() <= w.abs().max() / config.qmax / 2 + 1e-7
    assert q.shape == w.shape and q.dtype == w.dtype


def test_values_sit_on_the_grid_per_channel():
    w = small()
    config = RTNConfig(bits=4, granularity="channel")
    q = quantize_tensor(w, config)
    scale = w.abs().amax(dim=1, keepdim=True) / config.qmax
    levels = q / scale
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.round().min() >= -8 and levels.round().max() <= 7


def test_protected_super_weight_is_exact_and_kept_out_of_the_scale():
    w = small()
    w[3, 17] = 5.0  # a super weight, 250x the others
    protected = quantize_tensor(w, RTNConfig(bits=4, granularity="channel"), protect=[(3, 17)])
    assert protected[3, 17] == 5.0
    unprotected = quantize_tensor(w, RTNConfig(bits=4, granularity="channel", protect=False), protect=[(3, 17)])
    row_error = lambda q: (q[3] - w[3]).abs().sum() - (q[3, 17] - w[3, 17]).abs()
    # without protection the outlier sets row 3's scale: every other weight of the row rounds to zero
    assert (unprotected[3].abs() > 0).sum() == 1
    assert row_error(protected) < 0.1 * row_error(unprotected)


def test_zscore_and_percentile_thresholds_are_as_specified():
    w = small()
    x, keep = w, torch.ones_like(w)
    z = clip_threshold(x, keep, RTNConfig(granularity="channel", clip="zscore", clip_value=2.0))
    expected = torch.minimum(x.abs().amax(1, keepdim=True), x.mean(1, keepdim=True).abs() + 2.0 * x.std(1, unbiased=False, keepdim=True))
    torch.testing.assert_close(z, expected)
    p = clip_threshold(x, keep, RTNConfig(granularity="channel", clip="percentile", clip_value=90.0))
    torch.testing.assert_close(p, torch.quantile(x.abs(), 0.9, dim=1, keepdim=True))


def test_search_never_does_worse_than_absmax():
    w = small(1)
    w[0, 0] = 0.3  # an ordinary outlier (not protected): clipping it can pay
    plain = quantize_tensor(w, RTNConfig(bits=4, granularity="channel"))
    searched = quantize_tensor(w, RTNConfig(bits=4, granularity="channel", clip="search"))
    assert ((searched - w) ** 2).sum(1).le(((plain - w) ** 2).sum(1) + 1e-9).all()


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError, match="bits"):
        RTNConfig(bits=3)
    with pytest.raises(UserError, match="clip_value"):
        RTNConfig(clip="zscore")
    with pytest.raises(UserError, match="multiple of group_size"):
        quantize_tensor(small(), RTNConfig(granularity="group", group_size=48))


def test_quantize_model_keeps_the_planted_super_weight():
    from superweights.compression.detect import DetectionSettings, find_super_weights
    from tests.tiny_models import ByteTokenizer, planted_llama, sampled_text

    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256),
                                settings=DetectionSettings(eval_tokens=256, window=128), progress=False)
    done = quantize_model(model, RTNConfig(bits=4, granularity="block", block_size=256), protected_entries(report))
    assert "model.layers.1.mlp.down_proj" in done and "lm_head" not in done
    assert model.model.layers[1].mlp.down_proj.weight[17, 99] == 50.0


def test_fp8_values_sit_on_the_e4m3_grid():
    w = small()
    config = RTNConfig(bits=8, granularity="channel", fmt="fp8")
    q = quantize_tensor(w, config)
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    levels = q / scale
    torch.testing.assert_close(levels, levels.to(torch.float8_e4m3fn).float(), atol=1e-3, rtol=1e-5)
    with pytest.raises(UserError, match="fp8"):
        RTNConfig(bits=4, fmt="fp8")


def test_activation_per_token_holds_the_super_activation_out_of_the_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    x[0, 5] = 2000.0  # a super activation on token 0, channel 5
    x[1:, 5] = 0.0  # and nothing there on the other tokens
    held = quantize_activation(x, ActivationConfig("int8", "token"), held_out=[5])
    plain = quantize_activation(x, ActivationConfig("int8", "token", protect=False), held_out=[5])
    assert held[0, 5] == 2000.0
    kept = [c for c in range(32) if c != 5]
    # protected: token 0's other channels are quantized with their own absmax / 127
    assert (held[0, kept] - x[0, kept]).abs().max() <= x[0, kept].abs().max() / 127 / 2 + 1e-6
    # unprotected: its step is 2000 / 127, about 16: every ordinary value of token 0 rounds to zero
    assert plain[0, kept].abs().max() == 0.0
    # the other tokens do not see token 0's outlier per token, they do per tensor
    torch.testing.assert_close(held[1:], plain[1:])
    per_tensor = quantize_activation(x, ActivationConfig("int8", "tensor", protect=False))
    assert per_tensor[1:].abs().max() < 17.0 and (per_tensor[1:] == 0).float().mean() > 0.9


def test_activation_hooks_are_removed_after_the_block():
    from tests.tiny_models import planted_llama

    model = planted_llama()
    ids = torch.arange(16)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        with quantize_activations(model, ActivationConfig("int8", "tensor", protect=False), modules):
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before)
    assert not torch.allclose(during, before)
