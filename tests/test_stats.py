"""The statistics on synthetic runs whose true answer is known, and on replays of recorded
H200 traces (no engine)."""
import glob
import json
import os

import numpy as np
import pytest
from prefix_cache_bench import analysis, defaults, intervals, protocol


HIT_MS, MISS_MS, COLD_MS = 5.0, 6.0, 8.0          # true mean TTFT of each condition, before any shift


def synthetic_run(rng, rounds=10, shift_ms=0.0, shift_at=None, noise=0.08, block_order=False):
    """Trials as run_trials makes them: TTFTs with multiplicative log-normal noise (mean 1)
    and, from order index shift_at on, every request slower by shift_ms (a level shift)."""
    schedule = protocol.run_schedule(1, range(rounds), block_order)
    shift_at = len(schedule) // 2 if shift_at is None else shift_at
    true_ms = {"cache_hit": HIT_MS, "cache_miss": MISS_MS, "cache_cold": COLD_MS}
    trials = []
    for order, (_, condition, r) in enumerate(schedule):
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
    result = analysis.compare(trials, "round")
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
    lo, hi = intervals.mean_ci95(xs)
    half = 2.2622 * xs.std(ddof=1) / np.sqrt(len(xs))         # t(0.975, 9) s / sqrt(n)
    assert [lo, hi] == pytest.approx([xs.mean() - half, xs.mean() + half], abs=1e-3)
    assert intervals.mean_ci95(np.full(5, 7.0)) == [7.0, 7.0]


def test_ratio_interval_pairing_cancels_what_a_round_shares():
    """Hit and cold that move together round by round (a shared level) give a narrow paired
    interval; treated as unpaired, the same numbers give a much wider one."""
    level = np.array([0.0, 3.0, -2.0, 5.0, 1.0, -1.0, 4.0, 0.5, -3.0, 2.0])
    hit, cold = 5.0 + level + 0.1 * np.sin(np.arange(10)), 10.0 + level
    ratio, paired = intervals.ratio_ci95(hit, cold, paired=True)
    _, unpaired = intervals.ratio_ci95(hit, cold, paired=False)
    assert ratio == pytest.approx(hit.mean() / cold.mean())
    assert paired[0] < ratio < paired[1] and unpaired[0] < ratio < unpaired[1]
    assert (unpaired[1] - unpaired[0]) > 2 * (paired[1] - paired[0])
    # a denominator indistinguishable from zero has no finite interval
    assert intervals.ratio_ci95(hit, np.array([1.0, -1.5] * 5), paired=True)[1] == [-np.inf, np.inf]


def test_level_shift_mid_run_biases_block_order_but_not_rounds():
    """A shift of +3 ms half-way: in block order it lands on the cold block only and
    inflates the saving; in rounds all conditions share it and the estimate stays true."""
    rng = np.random.default_rng(1)
    block_errors, round_errors = [], []
    for _ in range(40):
        for block_order, errors in ((True, block_errors), (False, round_errors)):
            trials = synthetic_run(rng, shift_ms=3.0, block_order=block_order)
            estimate = analysis.compare(trials, "trial" if block_order else "round")["ttft_saving_pct"]
            errors.append(estimate - true_saving(3.0))
    assert abs(np.mean(round_errors)) < 1.0                     # percentage points
    assert np.mean(block_errors) > 10.0                         # the design's order: badly biased


def test_halves_flag_a_run_whose_level_moved():
    rng = np.random.default_rng(2)
    steady = analysis.reproducibility(synthetic_run(rng, rounds=20, noise=0.03), "round")
    assert steady["stable"] is True and len(steady["per_round_saving_pct"]) == 20
    # the cold requests alone get 4 ms slower half-way (something changed what a cold prefill costs)
    moved = synthetic_run(rng, rounds=20, noise=0.03)
    for t in moved:
        if t["condition"] == "cache_cold" and t["round"] >= 10:
            t["ttft_ms"] += 4.0
    report = analysis.reproducibility(moved, "round")
    assert report["stable"] is False
    assert report["halves"][1]["ttft_saving_pct"] > report["halves"][0]["ttft_saving_pct"] + 10


@pytest.mark.parametrize("a,ci_a,b,ci_b,want", [
    (40.0, [35.0, 45.0], 33.0, [28.0, 38.0], True),      # 7 apart, sqrt(5^2 + 5^2) = 7.07
    (40.0, [35.0, 45.0], 32.0, [27.0, 37.0], False),     # 8 apart
    (32.0, [27.0, 37.0], 40.0, [39.0, 50.0], False),     # facing sides 5 and 1: 8 > sqrt(26) = 5.1
    (32.0, [22.0, 37.0], 40.0, [33.0, 41.0], True),      # facing sides 5 and 7: 8 < sqrt(74) = 8.6
])
def test_agree_uses_the_facing_half_widths(a, ci_a, b, ci_b, want):
    assert intervals.agree(a, ci_a, b, ci_b) is want
    assert intervals.agree(b, ci_b, a, ci_a) is want


def test_interval_coverage_is_close_to_95_percent_at_10_rounds():
    """Simulated runs of 10 rounds (12% noise, a level shift of random size half-way): how
    often does the paired interval hold the true saving? 400 runs: about +-1.1 points of
    binomial noise on the rate. A paired BCa bootstrap scored 0.89 here."""
    rng = np.random.default_rng(3)
    runs, covered = 400, 0
    for _ in range(runs):
        shift = rng.uniform(0, 3)
        lo, hi = analysis.compare(synthetic_run(rng, rounds=10, shift_ms=shift, noise=0.12), "round")["ttft_saving_ci95"]
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
        lo, hi = analysis.compare(trials, "round")["ttft_saving_ci95"]
        covered += lo <= true_saving(0.0) <= hi
    assert 0.925 <= covered / runs <= 0.985, covered / runs


# ----------------------------------------------------------------------------- drift over tens of seconds
# What the H200 shows: the short steps (a hit, a miss: host-bound) move by up to +-15% for
# 10-60 s at a time, while a long cold prefill stays within 1%. Rounds next to each other then
# share a level, so an interval over rounds is too narrow; one over time blocks holds it.
LEVEL_MS = {"cache_hit": 17.0, "cache_miss": 15.5, "cache_cold": 58.0}     # the 8B shape at 2048/256


def drifting_run(rng, rounds=40, round_s=3.2, num_blocks=8, noise=0.12, amplitude=0.15, segment_s=(10, 60)):
    """A run in time: each request at its place in the schedule, the hit and miss levels
    multiplied by a host level drawn uniformly in 1 +- amplitude for segments of 10-60 s."""
    edges, levels, t = [], [], -rng.uniform(0, segment_s[1])
    while t < rounds * round_s:
        edges.append(t)
        levels.append(rng.uniform(1 - amplitude, 1 + amplitude))
        t += rng.uniform(*segment_s)
    trials = []
    for order, (_, condition, r) in enumerate(protocol.run_schedule(1, range(rounds))):
        start_s = order * round_s / 3
        short = condition != "cache_cold"
        level = levels[np.searchsorted(edges, start_s, "right") - 1] if short else 1.0
        sd = noise if short else 0.01
        trials.append({"condition": condition, "round": r, "order": order, "start_s": start_s,
                       "block": protocol.block_of(r, rounds, num_blocks),
                       "ttft_ms": LEVEL_MS[condition] * level * rng.lognormal(-sd ** 2 / 2, sd)})
    return trials


def coverage_and_agreement(runs, unit, truth):
    """Share of runs whose interval holds truth, and of disjoint pairs of runs that agree."""
    estimates = [(c["ttft_saving_pct"], c["ttft_saving_ci95"]) for c in (analysis.compare(r, unit) for r in runs)]
    covered = np.mean([lo <= truth <= hi for _, (lo, hi) in estimates])
    agreeing = np.mean([intervals.agree(*estimates[i], *estimates[i + 1]) for i in range(0, len(estimates) - 1, 2)])
    return covered, agreeing


def test_block_means_are_what_the_block_interval_is_taken_over():
    """The block interval is the paired interval over the blocks' means: the same as the round
    interval of a run whose rounds were those means, and not the one over the raw rounds. Three
    blocks (2 degrees of freedom), so the interval is finite and the comparison can fail."""
    noise = {"cache_hit": [0.0, 0.3, -0.2, 0.1, 0.4, -0.1], "cache_miss": [0.1, 0.0, 0.2, -0.1, 0.0, 0.3],
             "cache_cold": [0.2, -0.3, 0.1, 0.3, -0.2, 0.0]}
    trials = [{"condition": c, "round": r, "block": r // 2, "ttft_ms": ms * (1 + 0.1 * r) + noise[c][r]}
              for c, ms in (("cache_hit", 2.0), ("cache_miss", 3.0), ("cache_cold", 4.0)) for r in range(6)]
    hit_means = analysis.unit_means(trials, "cache_hit", "block").tolist()
    assert hit_means == pytest.approx([(2.0 + 0.0 + 2.2 + 0.3) / 2, (2.4 - 0.2 + 2.6 + 0.1) / 2, (2.8 + 0.4 + 3.0 - 0.1) / 2])
    block_means = [{"condition": c, "round": b, "ttft_ms": m} for c in defaults.CONDITIONS
                   for b, m in enumerate(analysis.unit_means(trials, c, "block"))]
    by_block, by_mean_rounds = analysis.compare(trials, "block"), analysis.compare(block_means, "round")
    assert np.isfinite(by_block["ttft_saving_ci95"]).all()
    for key in ("ttft_saving_pct", "ttft_saving_ci95", "ttft_degradation_ci95", "ttft_saving_ms_ci95"):
        assert by_block[key] == pytest.approx(by_mean_rounds[key])
    assert by_block["ttft_saving_ci95"] != pytest.approx(analysis.compare(trials, "round")["ttft_saving_ci95"])


def test_drift_of_tens_of_seconds_breaks_round_intervals_and_blocks_hold_it_better():
    """The drift the H200 shows, simulated: 40 rounds of 3.2 s in 8 blocks of 16 s. The
    round interval holds the true saving in only about 2 runs of 3; the block interval in
    about 4 of 5, and two runs agree in about 85% of pairs."""
    rng = np.random.default_rng(5)
    truth = intervals.saving_pct(LEVEL_MS["cache_hit"] / LEVEL_MS["cache_cold"])
    runs = [drifting_run(rng) for _ in range(300)]
    round_covered, round_agree = coverage_and_agreement(runs, "round", truth)
    block_covered, block_agree = coverage_and_agreement(runs, "block", truth)
    assert round_covered < 0.75 and round_agree < 0.8
    assert 0.75 <= block_covered < 0.9 and block_agree >= 0.8
    assert block_covered - round_covered > 0.1


def test_blocks_longer_than_the_drift_give_the_promised_coverage():
    """The same drift with 6 blocks of 43 s (--num-blocks 6 --min-block-seconds 40): blocks
    outlast most level segments, and the interval holds the truth in about 9 runs of 10."""
    rng = np.random.default_rng(6)
    truth = intervals.saving_pct(LEVEL_MS["cache_hit"] / LEVEL_MS["cache_cold"])
    covered, agreeing = coverage_and_agreement([drifting_run(rng, rounds=80, num_blocks=6) for _ in range(300)],
                                               "block", truth)
    assert covered >= 0.87 and agreeing >= 0.9


RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def recorded_rounds(size_a):
    """Per-round TTFTs of every shipped Llama-3.1-8B-shape H200 run of A=size_a, B=256 on one GPU
    and without a second cache tier (a run with one has a fourth condition, whose untimed steps
    move the others' level): one list of {condition: ttft_ms} per run, in round order."""
    runs = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "h200-*8b*", "**", f"results_phase2_a{size_a}_b256.json"),
                                 recursive=True)):
        rows = {}
        data = json.load(open(path))
        if data["environment"]["device_count"] != 1 or defaults.TIER_CONDITION in data:
            continue
        for c in defaults.CONDITIONS:
            for t in data[c]["trials"]:
                rows.setdefault(t["round"], {})[c] = t["ttft_ms"]
        runs.append([rows[r] for r in sorted(rows)])
    return runs


def replayed_run(rng, runs, rounds=40, num_blocks=8, segment_rounds=(3, 19)):
    """A run made of the recorded ones: contiguous stretches of 3-19 real rounds (10-60 s at
    3.2 s a round), each from a random run at a random place. So the host's real state changes
    (between runs and inside them) land inside one run, at the time scale the H200 shows."""
    picked = []
    while len(picked) < rounds:
        run = runs[rng.integers(len(runs))]
        length, start = rng.integers(segment_rounds[0], segment_rounds[1] + 1), rng.integers(len(run))
        picked += [run[(start + i) % len(run)] for i in range(length)]
    return [{"condition": c, "round": r, "block": protocol.block_of(r, rounds, num_blocks), "ttft_ms": row[c]}
            for r, row in enumerate(picked[:rounds]) for c in defaults.CONDITIONS]


# Each shipped run changes the replays, and 200 replays know a coverage of 0.85 only to +-0.025
# (one standard error): the floors sit about two standard errors under what the shipped traces give
# (17 runs a config: 0.97, 0.86 and 0.82 for blocks, pairs agreeing 0.98, 0.91 and 0.81; 0.96, 0.73
# and 0.625 for rounds). The 17th run's host ran twice as slow for two of its five processes,
# which took 8192's agreement from 0.88 to 0.81 (and its coverage from 0.855 to 0.82).
@pytest.mark.parametrize("size_a,block_coverage,block_agreement,gain_over_rounds",
                         [(512, 0.9, 0.93, -0.02), (2048, 0.8, 0.85, 0.06), (8192, 0.76, 0.75, 0.06)])
def test_replayed_h200_traces_are_held_by_block_intervals(size_a, block_coverage, block_agreement, gain_over_rounds):
    """Replays of the shipped H200 traces (results/h200-*8b*): the truth is the saving of all
    recorded rounds together. Where the traces drift (2048, 8192), block intervals hold it far
    more often than round intervals; where they barely do (512), both hold it about 95% of the time."""
    runs = recorded_rounds(size_a)
    assert len(runs) >= 5, "the shipped H200 runs are missing"
    every_round = [row for run in runs for row in run]
    truth = intervals.saving_pct(np.mean([r["cache_hit"] for r in every_round]) / np.mean([r["cache_cold"] for r in every_round]))
    rng = np.random.default_rng(size_a)
    replays = [replayed_run(rng, runs) for _ in range(200)]
    covered, agreeing = coverage_and_agreement(replays, "block", truth)
    round_covered, _ = coverage_and_agreement(replays, "round", truth)
    assert covered >= block_coverage and agreeing >= block_agreement
    assert covered >= round_covered + gain_over_rounds


THREE_CONFIG_RUNS = ("h200-llama3.1-8b-shape-one-process", "h200-llama3.1-8b-shape-repro")


def recorded_processes(size_a):
    """Per-round TTFTs of every shipped single-process H200 run of the 3-config command, one
    list per engine process: seven processes on four machine leases."""
    runs = []
    for folder in THREE_CONFIG_RUNS:
        for path in sorted(glob.glob(os.path.join(RESULTS, folder, "*", f"results_phase2_a{size_a}_b256.json"))):
            rows = {}
            data = json.load(open(path))
            for c in defaults.CONDITIONS:
                for t in data[c]["trials"]:
                    rows.setdefault(t["round"], {})[c] = t["ttft_ms"]
            runs.append([rows[r] for r in sorted(rows)])
    return runs


def replayed_invocation(rng, runs, processes, rounds):
    """One invocation of processes engine processes: each a different recorded process, a
    stretch of rounds real rounds of it from a random place."""
    trials = []
    for k, j in enumerate(rng.choice(len(runs), size=processes, replace=False)):
        run, start = runs[j], rng.integers(len(runs[j]))
        for r in range(rounds):
            row = run[(start + r) % len(run)]
            trials += [{"condition": c, "round": k * rounds + r, "process": k, "block": k * 100 + r * 3 // rounds,
                        "ttft_ms": row[c]} for c in defaults.CONDITIONS]
    return trials


# a 3-config round took 3.1 s
DEFAULT_ROUNDS = defaults.NUM_BLOCKS * protocol.rounds_per_block(3.1, defaults.MIN_BLOCK_SECONDS)


@pytest.mark.parametrize("size_a,max_median_half_width", [(512, 3.0), (2048, 3.5), (8192, 1.2)])
def test_intervals_over_engine_processes_hold_what_other_processes_measured(size_a, max_median_half_width):
    """The recorded H200 processes differ in level (8192/256: 88.8-90.2% in four processes on
    two leases, each interval +-0.4-0.8): one process's blocks cannot see that. Replayed, an
    invocation of the default PROCESSES processes of DEFAULT_ROUNDS rounds holds the truth
    (all recorded rounds) 9 times in 10 and more, where one process's 84 rounds in 12 blocks
    held it at most 3 times in 4 at 2048 and 8192."""
    runs = recorded_processes(size_a)
    assert len(runs) == 7, "the shipped H200 runs of the 3-config command are missing"
    per_run = [(np.mean([r["cache_hit"] for r in run]), np.mean([r["cache_cold"] for r in run])) for run in runs]
    truth = intervals.saving_pct(np.mean([h for h, _ in per_run]) / np.mean([c for _, c in per_run]))
    rng = np.random.default_rng(size_a)
    invocations = [replayed_invocation(rng, runs, defaults.PROCESSES, DEFAULT_ROUNDS) for _ in range(300)]
    covered, agreeing = coverage_and_agreement(invocations, "process", truth)
    half_widths = [np.ptp(analysis.compare(t, "process")["ttft_saving_ci95"]) / 2 for t in invocations]
    assert (defaults.PROCESSES, DEFAULT_ROUNDS) == (5, 15)
    assert covered >= 0.9 and agreeing >= 0.9
    assert np.median(half_widths) <= max_median_half_width
    one_process = [replayed_invocation(rng, runs, 1, 84) for _ in range(300)]
    for t in (t for run in one_process for t in run):
        t["block"] = t["round"] * 12 // 84
    one_covered, _ = coverage_and_agreement(one_process, "block", truth)
    if size_a != 512:
        assert one_covered < 0.75
