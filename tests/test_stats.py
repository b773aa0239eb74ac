"""The statistics on synthetic runs whose true answer is known (no engine)."""
import numpy as np
import pytest

import phase2_experiment as p

HIT_MS, MISS_MS, COLD_MS = 5.0, 6.0, 8.0          # true mean TTFT of each condition, before any shift


def synthetic_run(rng, rounds=10, shift_ms=0.0, shift_at=None, noise=0.08, block_order=False):
    """Trials as run_trials makes them: TTFTs with multiplicative log-normal noise (mean 1)
    and, from order index shift_at on, every request slower by shift_ms (a level shift)."""
    schedule = p.trial_schedule(rounds, block_order)
    shift_at = len(schedule) // 2 if shift_at is None else shift_at
    true_ms = {"cache_hit": HIT_MS, "cache_miss": MISS_MS, "cache_cold": COLD_MS}
    trials = []
    for order, (condition, r) in enumerate(schedule):
        level = true_ms[condition] + (shift_ms if order >= shift_at else 0.0)
        ttft = level * rng.lognormal(-noise ** 2 / 2, noise)
        trials.append({"condition": condition, "round": r, "order": order, "ttft_ms": ttft})
    return trials


def true_saving(shift_ms):
    """The saving without noise when half the run is shift_ms slower for every request:
    both conditions at the run's mean level."""
    return (COLD_MS - HIT_MS) / (COLD_MS + shift_ms / 2) * 100


def test_saving_and_degradation_formulas():
    hit, miss, cold = [4.0, 6.0], [6.0, 6.0], [10.0, 10.0]
    trials = [{"condition": c, "round": r, "ttft_ms": ms[r]}
              for c, ms in (("cache_hit", hit), ("cache_miss", miss), ("cache_cold", cold)) for r in (0, 1)]
    result = p.compare(trials, paired=True)
    assert result["ttft_saving_pct"] == pytest.approx(50.0)          # (10 - 5) / 10
    assert result["ttft_degradation_pct"] == pytest.approx(20.0)     # (6 - 5) / 5
    # the interval goes through the same functions as the point value, bounds in order
    lo, hi = result["ttft_saving_ci95"]
    assert lo < 50.0 < hi
    assert result["ttft_saving_ms"] == pytest.approx(5.0)
    # per-round differences 6 and 4 ms: mean 5, sd 1.414, t(0.975, 1) = 12.706
    assert result["ttft_saving_ms_ci95"] == pytest.approx([5 - 12.706, 5 + 12.706], abs=1e-3)


def test_mean_ci95_is_students_t_interval():
    xs = np.array([9.1, 9.8, 10.0, 10.2, 10.4, 10.9, 11.3, 12.0, 9.5, 10.6])
    lo, hi = p.mean_ci95(xs)
    half = 2.2622 * xs.std(ddof=1) / np.sqrt(len(xs))         # t(0.975, 9) s / sqrt(n)
    assert [lo, hi] == pytest.approx([xs.mean() - half, xs.mean() + half], abs=1e-3)
    assert p.mean_ci95(np.full(5, 7.0)) == [7.0, 7.0]


def test_ratio_interval_pairing_cancels_what_a_round_shares():
    """Hit and cold that move together round by round (a shared level) give a narrow paired
    interval; treated as unpaired, the same numbers give a much wider one."""
    level = np.array([0.0, 3.0, -2.0, 5.0, 1.0, -1.0, 4.0, 0.5, -3.0, 2.0])
    hit, cold = 5.0 + level + 0.1 * np.sin(np.arange(10)), 10.0 + level
    ratio, paired = p.ratio_ci95(hit, cold, paired=True)
    _, unpaired = p.ratio_ci95(hit, cold, paired=False)
    assert ratio == pytest.approx(hit.mean() / cold.mean())
    assert paired[0] < ratio < paired[1] and unpaired[0] < ratio < unpaired[1]
    assert (unpaired[1] - unpaired[0]) > 2 * (paired[1] - paired[0])
    # a denominator indistinguishable from zero has no finite interval
    assert p.ratio_ci95(hit, np.array([1.0, -1.5] * 5), paired=True)[1] == [-np.inf, np.inf]


def test_level_shift_mid_run_biases_block_order_but_not_rounds():
    """A shift of +3 ms half-way: in block order it lands on the cold block only and
    inflates the saving; in rounds all conditions share it and the estimate stays true."""
    rng = np.random.default_rng(1)
    block_errors, round_errors = [], []
    for _ in range(40):
        for block_order, errors in ((True, block_errors), (False, round_errors)):
            trials = synthetic_run(rng, shift_ms=3.0, block_order=block_order)
            estimate = p.compare(trials, paired=not block_order)["ttft_saving_pct"]
            errors.append(estimate - true_saving(3.0))
    assert abs(np.mean(round_errors)) < 1.0                     # percentage points
    assert np.mean(block_errors) > 10.0                         # the design's order: badly biased


def test_halves_flag_a_run_whose_level_moved():
    rng = np.random.default_rng(2)
    steady = p.reproducibility(synthetic_run(rng, rounds=20, noise=0.03), paired=True)
    assert steady["stable"] is True and len(steady["per_round_saving_pct"]) == 20
    # the cold requests alone get 4 ms slower half-way (something changed what a cold prefill costs)
    moved = synthetic_run(rng, rounds=20, noise=0.03)
    for t in moved:
        if t["condition"] == "cache_cold" and t["round"] >= 10:
            t["ttft_ms"] += 4.0
    report = p.reproducibility(moved, paired=True)
    assert report["stable"] is False
    assert report["halves"][1]["ttft_saving_pct"] > report["halves"][0]["ttft_saving_pct"] + 10


@pytest.mark.parametrize("a,ci_a,b,ci_b,want", [
    (40.0, [35.0, 45.0], 33.0, [28.0, 38.0], True),      # 7 apart, sqrt(5^2 + 5^2) = 7.07
    (40.0, [35.0, 45.0], 32.0, [27.0, 37.0], False),     # 8 apart
    (32.0, [27.0, 37.0], 40.0, [39.0, 50.0], False),     # facing sides 5 and 1: 8 > sqrt(26) = 5.1
    (32.0, [22.0, 37.0], 40.0, [33.0, 41.0], True),      # facing sides 5 and 7: 8 < sqrt(74) = 8.6
])
def test_agree_uses_the_facing_half_widths(a, ci_a, b, ci_b, want):
    assert p.agree(a, ci_a, b, ci_b) is want
    assert p.agree(b, ci_b, a, ci_a) is want


def test_interval_coverage_is_close_to_95_percent_at_10_rounds():
    """Simulated runs of 10 rounds (12% noise, a level shift of random size half-way): how
    often does the paired interval hold the true saving? 400 runs: about +-1.1 points of
    binomial noise on the rate. A paired BCa bootstrap scored 0.89 here."""
    rng = np.random.default_rng(3)
    runs, covered = 400, 0
    for _ in range(runs):
        shift = rng.uniform(0, 3)
        lo, hi = p.compare(synthetic_run(rng, rounds=10, shift_ms=shift, noise=0.12), paired=True)["ttft_saving_ci95"]
        covered += lo <= true_saving(shift) <= hi
    assert 0.925 <= covered / runs <= 0.975, covered / runs


def test_interval_coverage_holds_with_outliers():
    """The same with 5% of requests taking twice as long (the wake-up stalls seen on CPU)."""
    rng = np.random.default_rng(4)
    runs, covered = 400, 0
    for _ in range(runs):
        trials = synthetic_run(rng, rounds=10, noise=0.12)
        for t in trials:
            t["ttft_ms"] *= 2 if rng.random() < 0.05 else 1
        lo, hi = p.compare(trials, paired=True)["ttft_saving_ci95"]
        covered += lo <= true_saving(0.0) <= hi
    assert 0.925 <= covered / runs <= 0.985, covered / runs
