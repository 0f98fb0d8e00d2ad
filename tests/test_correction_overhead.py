"""The CPU micro-benchmark of the protected down-projection (benchmarks/correction_overhead.py) on a short run: the
plugin's layer (vLLM's own linear method, the super-weight columns held out and added back in float32) computes
what vLLM's plain layer computes with every weight in it, at every token count it times."""

import pytest

from benchmarks import correction_overhead


def test_protected_layer_equals_the_plain_one_where_it_is_timed():
    rows = correction_overhead.measure(tokens=(1, 32), min_run_time=0.05)
    assert [row["tokens"] for row in rows] == [1, 32]
    for row in rows:
        # float32: the two sums differ only by rounding, far below the super activation's scale
        assert row["max_abs_difference"] <= 1e-4 * row["output_scale"], row
        assert row["plain_us"] > 0 and row["protected_us"] > 0
        assert row["protected_over_plain"] == pytest.approx(row["protected_us"] / row["plain_us"], rel=0.01)
