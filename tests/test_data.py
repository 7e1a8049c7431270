"""seqpar.launch.data: the long-tail length generator against the published Wikipedia statistics."""

from __future__ import annotations

import numpy as np
import pytest

from seqpar.launch.data import WIKIPEDIA_TOKEN_STATS, long_tail_lengths

# Percentiles and the share above 8K settle quickly; the mean (alpha < 2: infinite variance) does not,
# so it gets a wider band. Tolerances are relative to the published targets.
TOLERANCE = {"median": 0.05, "p90": 0.06, "p99": 0.08, "p99.9": 0.10, "mean": 0.10,
             "fraction_above_8k": 0.06, "token_share_above_8k": 0.12}


def sample_stats(lengths: np.ndarray) -> dict[str, float]:
    above = lengths >= 8192
    p50, p90, p99, p999 = np.percentile(lengths, [50, 90, 99, 99.9])
    return {"median": p50, "p90": p90, "p99": p99, "p99.9": p999, "mean": lengths.mean(),
            "fraction_above_8k": above.mean(), "token_share_above_8k": lengths[above].sum() / lengths.sum()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_statistics_match_the_published_targets(seed):
    stats = sample_stats(long_tail_lengths(1_000_000, seed=seed))
    for name, target in WIKIPEDIA_TOKEN_STATS.items():
        assert stats[name] == pytest.approx(target, rel=TOLERANCE[name]), name


def test_same_seed_same_lengths_and_types():
    a = long_tail_lengths(1000, seed=42)
    assert a.dtype == np.int64 and a.shape == (1000,)
    assert np.array_equal(a, long_tail_lengths(1000, seed=42))
    assert not np.array_equal(a, long_tail_lengths(1000, seed=43))


def test_clipping_to_a_context_window():
    lengths = long_tail_lengths(200_000, seed=0, max_len=32768, min_len=16)
    assert lengths.min() >= 16 and lengths.max() == 32768  # the tail is long enough to hit the cap


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be"),
    ({"n": 10, "min_len": 0}, "min_len"),
    ({"n": 10, "max_len": 5, "min_len": 8}, "max_len"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        long_tail_lengths(seed=0, **kwargs)
