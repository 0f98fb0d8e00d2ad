"""Round-to-nearest quantization math on small tensors, with super weights held out."""

import pytest
import torch

from compression.errors import UserError
from compression.quantize import RTNConfig, clip_threshold, protected_entries, quantize_model, quantize_tensor


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
    row_error = lambda q: (q[3] - w[3]).abs().sum() - (q[3, 17] - w[3, 17]).abs()  # noqa: E731
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
    from compression.detect import DetectionSettings, find_super_weights
    from tests.tiny_models import ByteTokenizer, planted_llama, sampled_text

    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256),
                                settings=DetectionSettings(eval_tokens=256, window=128), progress=False)
    done = quantize_model(model, RTNConfig(bits=4, granularity="block", block_size=256), protected_entries(report))
    assert "model.layers.1.mlp.down_proj" in done and "lm_head" not in done
    assert model.model.layers[1].mlp.down_proj.weight[17, 99] == 50.0
