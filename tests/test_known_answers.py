"""Known-answer tests of the statistics, the comparison, the summary table and the process merge.

Every expected number is worked out by hand (in the comments) or by a closed formula written out
here with plain Python floats; nothing expected comes from prefix_cache_bench itself.

Student t quantiles t(0.975, df), 30 digits from mpmath (root of the regularized incomplete beta),
also in any t table (12.706, 4.303, 3.182, 2.776); df 1 and 2 have closed forms:
t(p, 1) = tan(pi (p - 1/2)), t(p, 2) = (2p - 1) / sqrt(2 p (1 - p)).
"""
import math
import os

import pytest

from prefix_cache_bench import analysis, intervals, processes, tables
from prefix_cache_bench.settings import RunSettings

T1 = 12.706204736174704      # = tan(0.475 pi)
T2 = 4.302652729749464       # = 0.95 / sqrt(0.04875)
T3 = 3.1824463052837095
T4 = 2.7764451051977943
REL = 1e-9
approx = lambda x: pytest.approx(x, rel=REL, abs=1e-12)


def fieller(mn, md, vn, vd, cov, t, finite=True):
    """Fieller's 95% interval of mn / md, step by step: the r with (mn - r md)^2 <= t^2 (vn - 2 r cov
    + r^2 vd), i.e. a r^2 - 2 b r + c <= 0; vn, vd, cov are the variances / covariance of the means.
    With finite=False, a denominator not clearly above 0 (a <= 0) or no real root gives (-inf, inf)."""
    t2 = t * t
    a = md * md - t2 * vd
    b = mn * md - t2 * cov
    c = mn * mn - t2 * vn
    disc = b * b - a * c
    if not finite and (a <= 0 or disc < 0):
        return -math.inf, math.inf
    assert a > 0 and disc >= 0, "the hand example must have a finite interval"
    low, high = (b - math.sqrt(disc)) / a, (b + math.sqrt(disc)) / a
    for r in (low, high):             # self-check: each bound sits where the pivot equals t^2
        assert (mn - r * md) ** 2 == pytest.approx(t2 * (vn - 2 * r * cov + r * r * vd), rel=1e-9)
    return low, high


def test_t_literals_match_closed_forms():
    assert T1 == pytest.approx(math.tan(0.475 * math.pi), rel=1e-14)
    assert T2 == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-14)


def test_ratio_ci95_paired_unpaired_and_unbounded():
    num, den = [8, 9, 7, 8], [20, 22, 19, 21]
    # by hand: mean(num) = 8, deviations 0, 1, -1, 0, sum sq 2, var 2/3, var of the mean 1/6;
    # mean(den) = 20.5, deviations -0.5, 1.5, -1.5, 0.5, sum sq 5, var 5/3, var of the mean 5/12;
    # cross products 0 + 1.5 + 1.5 + 0 = 3, cov 1, cov of the means 1/4; 4 pairs: t(0.975, 3)
    ratio, (low, high) = intervals.ratio_ci95(num, den, paired=True)
    exp_low, exp_high = fieller(8.0, 20.5, 1 / 6, 5 / 12, 1 / 4, T3)
    assert ratio == approx(8 / 20.5)
    assert [low, high] == [approx(exp_low), approx(exp_high)]
    assert exp_low < 8 / 20.5 < exp_high
    # unpaired: the same, the covariance term 0 (df still n - 1 = 3, as documented)
    ratio, (low, high) = intervals.ratio_ci95(num, den, paired=False)
    exp_low_u, exp_high_u = fieller(8.0, 20.5, 1 / 6, 5 / 12, 0.0, T3)
    assert ratio == approx(8 / 20.5)
    assert [low, high] == [approx(exp_low_u), approx(exp_high_u)]
    assert exp_high_u - exp_low_u > exp_high - exp_low       # the positive covariance narrows the paired one
    # denominator [0.5, 1.5, -0.5, 2.5]: mean 1, deviations -0.5, 0.5, -1.5, 1.5, var 5/3, of the mean 5/12;
    # a = 1 - t^2 5/12 = 1 - 10.13 * 0.417 < 0: the mean is not clearly above 0, no finite interval
    assert 1 - T3 ** 2 * 5 / 12 < 0
    ratio, ci = intervals.ratio_ci95(num, [0.5, 1.5, -0.5, 2.5], paired=True)
    assert ratio == approx(8.0) and ci == [-math.inf, math.inf]


def test_mean_ci95_by_hand_and_constant():
    # [1..5]: mean 3, var 10/4 = 2.5, sem sqrt(2.5 / 5) = sqrt(0.5), 4 df
    half = T4 * math.sqrt(0.5)                      # 1.9632...
    assert intervals.mean_ci95([1, 2, 3, 4, 5]) == [approx(3 - half), approx(3 + half)]
    assert intervals.mean_ci95([4, 1, 5, 3, 2]) == [approx(3 - half), approx(3 + half)]
    assert intervals.mean_ci95([7.5, 7.5, 7.5]) == [7.5, 7.5]
    assert all(math.isnan(x) for x in intervals.mean_ci95([12.5]))    # one value: no interval (scipy: nan)


def test_saving_degradation_and_agree():
    assert intervals.saving_pct(0.75) == approx(25.0)          # (1 - 0.75) x 100
    assert intervals.saving_pct(1.1) == approx(-10.0)
    assert intervals.degradation_pct(1.2) == approx(20.0)      # (1.2 - 1) x 100
    assert intervals.degradation_pct(0.9) == approx(-10.0)
    # agree: |e1 - e2| <= sqrt(h1^2 + h2^2) with the half-widths facing the other estimate.
    # 10 [9.5, 13] and 14 [11, 14.5]: facing 13 - 10 = 3 and 14 - 11 = 3, sqrt(18) = 4.24 >= 4: agree
    # (the far sides, 0.5 and 0.5, would give 0.71 < 4: disagree)
    assert intervals.agree(10.0, [9.5, 13.0], 14.0, [11.0, 14.5]) is True
    assert intervals.agree(14.0, [11.0, 14.5], 10.0, [9.5, 13.0]) is True
    # 10 [2, 11] and 14 [13, 30]: facing 1 and 1, sqrt(2) = 1.41 < 4: disagree (far sides 8, 16 would agree)
    assert intervals.agree(10.0, [2.0, 11.0], 14.0, [13.0, 30.0]) is False
    assert intervals.agree(14.0, [13.0, 30.0], 10.0, [2.0, 11.0]) is False
    # exactly on the edge: 10 [7, 13] and 15 [11, 19]: facing 3 and 4, sqrt(25) = 5 = 15 - 10: agree
    assert intervals.agree(10.0, [7.0, 13.0], 15.0, [11.0, 19.0]) is True


def binom_cdf(k, n, q):
    return sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k + 1))


def test_quantile_ci95_ranks_from_the_binomial():
    # median of 20: binomial(20, 1/2) CDF(5) = 21700 / 2^20 = 0.0207 < 0.025 <= CDF(6) = 0.0577, so the
    # lower bound is the 6th smallest; CDF(13) = 0.9423 < 0.975 <= CDF(14) = 0.9793, the upper the 14 + 1 = 15th.
    # P(6 <= count <= 14) = 0.9793 - 0.0207 = 0.9586 >= 0.95
    assert binom_cdf(5, 20, 0.5) == approx(21700 / 2 ** 20)
    assert binom_cdf(5, 20, 0.5) < 0.025 <= binom_cdf(6, 20, 0.5)
    assert binom_cdf(13, 20, 0.5) < 0.975 <= binom_cdf(14, 20, 0.5)
    values = [10.0 * i for i in (7, 3, 19, 1, 12, 20, 5, 16, 9, 2, 14, 11, 18, 4, 8, 15, 6, 13, 17, 10)]
    assert intervals.quantile_ci95(values, 0.5) == [60.0, 150.0]
    # p99 of 50: CDF(47) = 1 - P(<= 2 misses of 50 at 1%) = 0.0138 < 0.025 <= CDF(48) = 0.0894: lower the
    # 48th smallest; CDF(49) = 1 - 0.99^50 = 0.395 < 0.975, so the upper rank is 50 + 1 > 50: None
    assert binom_cdf(47, 50, 0.99) < 0.025 <= binom_cdf(48, 50, 0.99)
    assert binom_cdf(49, 50, 0.99) == approx(1 - 0.99 ** 50) and binom_cdf(49, 50, 0.99) < 0.975
    assert intervals.quantile_ci95([float(i) for i in range(50, 0, -1)], 0.99) == [48.0, None]
    assert intervals.quantile_ci95([], 0.5) == [None, None]


def trial(condition, rnd, ttft):
    return {"condition": condition, "round": rnd, "ttft_ms": ttft}


def test_compare_over_rounds():
    # per-round means, rounds 1, 2, 3: hit 11 (two trials, 10 and 12), 10, 12; miss 14, 12, 13; cold 31, 27, 32
    trials = [trial("cache_hit", 1, 10.0), trial("cache_cold", 3, 32.0), trial("cache_hit", 1, 12.0),
              trial("cache_miss", 1, 14.0), trial("cache_cold", 1, 31.0), trial("cache_hit", 2, 10.0),
              trial("cache_miss", 2, 12.0), trial("cache_cold", 2, 27.0), trial("cache_hit", 3, 12.0),
              trial("cache_miss", 3, 13.0)]
    got = analysis.compare(trials, "round")
    # hit: mean 11, deviations 0, -1, 1, var 1, of the mean 1/3
    # cold: mean 30, deviations 1, -3, 2, var 14/2 = 7, of the mean 7/3; cov (0 + 3 + 2)/2 = 2.5, of the means 5/6
    low, high = fieller(11.0, 30.0, 1 / 3, 7 / 3, 5 / 6, T2)
    assert got["ttft_saving_pct"] == approx((1 - 11 / 30) * 100)            # 63.33
    assert got["ttft_saving_ci95"] == [approx((1 - high) * 100), approx((1 - low) * 100)]
    # miss: mean 13, deviations 1, -1, 0, var 1, of the mean 1/3; cov with hit (0 + 1 + 0)/2 = 0.5, of the means 1/6
    low, high = fieller(13.0, 11.0, 1 / 3, 1 / 3, 1 / 6, T2)
    assert got["ttft_degradation_pct"] == approx((13 / 11 - 1) * 100)       # 18.18
    assert got["ttft_degradation_ci95"] == [approx((low - 1) * 100), approx((high - 1) * 100)]
    # cold - hit per round: 20, 17, 20; mean 19, deviations 1, -2, 1, var 6/2 = 3, sem sqrt(3/3) = 1
    assert got["ttft_saving_ms"] == approx(19.0)
    assert got["ttft_saving_ms_ci95"] == [approx(19 - T2), approx(19 + T2)]


def row_cells(table, prefix):
    row = next(line for line in table.splitlines() if line.startswith(f"| {prefix} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_summary_table_cells():
    def result(hit, miss, cold, sds, saving_ci, ok=True, stable=True):
        stats = lambda mean, sd: {"ttft_mean": mean, "ttft_stdev": sd, "prompt_tokens": 300}
        return {"cache_hit": {"stats": {**stats(hit, sds[0]), "cached_tokens": 240}},
                "cache_miss": {"stats": stats(miss, sds[1])}, "cache_cold": {"stats": stats(cold, sds[2])},
                "ttft_degradation_pct": (miss - hit) / hit * 100, "ttft_saving_pct": (1 - hit / cold) * 100,
                "ttft_saving_ci95": saving_ci, "cache_audit": {"ok": ok, "problems": []},
                "reproducibility": {"stable": stable}}
    configs = {(256, 512): result(12.0, 15.5, 40.0, (1.0, 0.25, 2.5), [65.04, 74.96]),
               (1024, 256): result(20.0, 19.0, 25.0, (0.004, 1.5, 3.0), [-3.0, None], ok=False, stable=False)}
    table = tables.summary_table(configs)
    assert table.splitlines()[0] == ("| config | hit TTFT ms | miss TTFT ms | cold TTFT ms | miss vs hit | "
                                     "hit saves vs cold (95% CI) | hit cached / prompt tokens | audit |")
    # (15.5 - 12) / 12 = 29.17% -> +29.2%; 1 - 12/40 = 70.0%, interval to one decimal [65.0, 75.0]
    assert row_cells(table, "A=256 / B=512") == ["A=256 / B=512", "12.00 ± 1.00", "15.50 ± 0.25", "40.00 ± 2.50",
                                                 "+29.2%", "70.0% [65.0, 75.0]", "240 / 300", "ok"]
    # (19 - 20) / 20 = -5.0%; 1 - 20/25 = 20.0%, unbounded above; halves disagreed; audit failed
    assert row_cells(table, "A=1024 / B=256") == ["A=1024 / B=256", "20.00 ± 0.00", "19.00 ± 1.50", "25.00 ± 3.00",
                                                  "-5.0%", "20.0% [-3.0, inf] UNSTABLE", "240 / 300", "FAILED"]


def process_result(hits, misses, colds, started_unix_s, warmup_ms, problems=(), counters=None):
    """One engine process's result for one config: 1 discarded round (0) and 2 measured ones (1, 2) in
    1 block; the run order hit, miss, cold each round, so the orders are 0..8; trial i starts at i s."""
    def t(condition, rnd, ttft, order):
        return {"condition": condition, "round": rnd, "order": order, "start_s": float(order), "ttft_ms": ttft,
                "total_time_ms": 100.0, "throughput_tok_s": 500.0, "prompt_tokens": 300, "cached_tokens": 0,
                "engine_ttft_ms": None, "prefill_ms": None, "throughput_request": {"cached_tokens": 0},
                **({"block": 0} if rnd else {})}
    result = {"phase": "phase2_python_api", "model": "m", "ttft_degradation_pct": 0.0,
              "config": {"context_size_a": 256, "context_size_b": 512, "max_output_tokens": 8, "num_trials": 2,
                         "warmup_trials": 1, "num_blocks": 1},
              "interval": {"interleaved_configs": ["256x512"]}, "warmup_time_ms": warmup_ms,
              "cache_audit": {"ok": not problems, "expected_hit_cached_tokens": 240, "requests_checked": 18,
                              "problems": list(problems), "engine_counters": counters},
              "environment": {"run_started_unix_s": started_unix_s, "engine_start_s": warmup_ms / 10,
                              "config_wall_s": 2.5}}
    for i, (c, values) in enumerate((("cache_hit", hits), ("cache_miss", misses), ("cache_cold", colds))):
        result[c] = {"trials": [t(c, r, values[r], 3 * r + i) for r in (1, 2)],
                     "discarded_trials": [t(c, 0, values[0], i)]}
    return result


OPTS = RunSettings(configs=((512, 256),), min_block_seconds=0.0, provenance={"tool": "test"})


def test_merge_two_processes():
    # measured hits 9.5, 10.5 | 10, 11: process means 10, 10.5; colds 29, 31 | 30.5, 31.5: means 30, 31
    p1 = process_result([50, 9.5, 10.5], [60, 12, 13], [70, 29, 31], 1000.0, 50.0,
                        counters={"prefix_cache_hits": 10, "scope": "process"})
    p2 = process_result([50, 10, 11], [60, 12.5, 13.5], [70, 30.5, 31.5], 1100.25, 70.0,
                        problems=["cache_hit trial 1 ttft request: cached_tokens=0"],
                        counters={"prefix_cache_hits": 7, "scope": "process"})
    merged = processes.merge_processes([p1, p2], [0, 9], OPTS, 321.0)
    hits = merged["cache_hit"]["trials"]
    # process 2's rounds after process 1's 1 + 2, its block after 1 block, its orders after 9 trials,
    # its start times moved by its clock, 100.25 s later than process 1's
    assert [(t["process"], t["round"], t["block"], t["order"], t["start_s"]) for t in hits] == [
        (0, 1, 0, 3, 3.0), (0, 2, 0, 6, 6.0), (1, 4, 1, 12, 103.25), (1, 5, 1, 15, 106.25)]
    assert [(t["process"], t["round"], t["order"], t["start_s"]) for t in merged["cache_cold"]["discarded_trials"]] == [
        (0, 0, 2, 2.0), (1, 3, 11, 102.25)]
    assert merged["environment"]["trial_order"][8:11] == ["cache_cold:2", "cache_hit:3", "cache_miss:3"]
    assert len(merged["environment"]["trial_order"]) == 18
    assert merged["cache_hit"]["stats"]["ttft_mean"] == approx(10.25) and merged["cache_hit"]["stats"]["num_trials"] == 4
    assert merged["config"]["num_trials"] == 4 and merged["config"]["num_blocks"] == 2
    assert merged["config"]["processes"] == 2
    assert merged["warmup_time_ms"] == approx(60.0) and merged["warmup_time_ms_per_process"] == [50.0, 70.0]
    audit = merged["cache_audit"]
    assert audit["ok"] is False and audit["requests_checked"] == 36
    assert audit["problems"] == ["process 2: cache_hit trial 1 ttft request: cached_tokens=0"]
    assert audit["engine_counters"]["prefix_cache_hits"] == 17
    assert audit["engine_counters"]["scope"] == "every request of the run's 2 processes, all configs"
    env = merged["environment"]
    assert env["engine_start_s_per_process"] == [5.0, 7.0] and env["config_wall_s"] == approx(5.0)
    assert env["run_wall_s"] == 321.0 and env["tool"] == "test"
    assert merged["harness_overhead_ms"] is None
    assert merged["interval"]["unit"] == "process" and merged["interval"]["processes"] == 2
    # the interval over the 2 processes' means, 1 df: hit 10, 10.5 (mean 10.25, var 0.125, of the mean
    # 0.0625); cold 30, 31 (mean 30.5, var 0.5, of the mean 0.25); cov 2 x 0.25 x 0.5 = 0.25, of the means 0.125.
    # a = 30.5^2 - 161.45 x 0.25 = 889.9 > 0: finite
    low, high = fieller(10.25, 30.5, 0.0625, 0.25, 0.125, T1)
    assert merged["ttft_saving_pct"] == approx((1 - 10.25 / 30.5) * 100)
    assert merged["ttft_saving_ci95"] == [approx((1 - high) * 100), approx((1 - low) * 100)]
    # cold - hit per process: 20, 20.5; mean 20.25, var 0.125, sem sqrt(0.125 / 2) = 0.25
    assert merged["ttft_saving_ms"] == approx(20.25)
    assert merged["ttft_saving_ms_ci95"] == [approx(20.25 - T1 * 0.25), approx(20.25 + T1 * 0.25)]
    assert merged["reproducibility"]["per_process_saving_pct"] == [approx(100 * (1 - 10 / 30)),
                                                                   approx(100 * (1 - 10.5 / 31))]


def test_merge_three_processes_and_an_unbounded_two():
    # process means: hit 10, 11, 10.5 and cold 30, 31.5, 31.5 (measured trials mean -+ 0.5)
    means = [(10.0, 30.0), (11.0, 31.5), (10.5, 31.5)]
    ps = [process_result([50, h - 0.5, h + 0.5], [60, 12, 13], [70, c - 0.5, c + 0.5], 1000.0 + 60 * k, 50.0)
          for k, (h, c) in enumerate(means)]
    merged = processes.merge_processes(ps, [0, 9, 18], OPTS, 500.0)
    assert [t["round"] for t in merged["cache_hit"]["trials"]] == [1, 2, 4, 5, 7, 8]
    assert merged["cache_audit"]["ok"] is True and merged["cache_audit"]["engine_counters"] is None
    # hit: mean 10.5, deviations -0.5, 0.5, 0, var 0.25, of the mean 1/12; cold: mean 31, deviations -1, 0.5,
    # 0.5, var 0.75, of the mean 0.25; cov (0.5 + 0.25 + 0)/2 = 0.375, of the means 0.125; 2 df
    low, high = fieller(10.5, 31.0, 1 / 12, 0.25, 0.125, T2)
    assert merged["ttft_saving_pct"] == approx((1 - 10.5 / 31) * 100)
    assert merged["ttft_saving_ci95"] == [approx((1 - high) * 100), approx((1 - low) * 100)]
    # cold - hit: 20, 20.5, 21; mean 20.5, var 0.25, sem sqrt(0.25 / 3)
    half = T2 * math.sqrt(0.25 / 3)
    assert merged["ttft_saving_ms_ci95"] == [approx(20.5 - half), approx(20.5 + half)]
    # two processes with cold means 30 and 40: var of the mean 25, a = 35^2 - 161.45 x 25 < 0: unbounded
    assert 35.0 ** 2 - T1 ** 2 * 25 < 0
    ps = [process_result([50, 9.5, 10.5], [60, 12, 13], [70, 29.5, 30.5], 1000.0, 50.0),
          process_result([50, 10.5, 11.5], [60, 12, 13], [70, 39.5, 40.5], 1060.0, 50.0)]
    merged = processes.merge_processes(ps, [0, 9], OPTS, 100.0)
    assert merged["ttft_saving_pct"] == approx((1 - 10.5 / 35) * 100)
    assert merged["ttft_saving_ci95"] == [-math.inf, math.inf]


def test_ttft_breakdown_parts_add_up_to_the_ttft():
    from prefix_cache_bench.engine_api import RequestResult
    # offline, a 1-token request: wall 10.0 ms, the engine's TTFT 9.0, queue 0.5, prefill step 6.0:
    # outside the engine 10.0 - 9.0 = 1.0, frontend and IPC 9.0 - 0.5 - 6.0 = 2.5; 1.0 + 2.5 + 0.5 + 6.0 = 10.0
    offline = RequestResult(wall_ms=10.0, prompt_tokens=9, cached_tokens=0, output_tokens=1,
                            engine_ttft_ms=9.0, prefill_ms=6.0, queue_ms=0.5)
    assert offline.ttft_breakdown() == {"outside_engine_ms": 1.0, "frontend_ipc_ms": 2.5, "queue_ms": 0.5,
                                        "prefill_step_ms": 6.0}
    # streamed: from the client's TTFT (12.0), not the whole request (30.0): outside 12.0 - 9.0 = 3.0
    streamed = RequestResult(wall_ms=30.0, ttft_ms=12.0, prompt_tokens=9, cached_tokens=0, output_tokens=4,
                             engine_ttft_ms=9.0, prefill_ms=6.0, queue_ms=0.5)
    assert streamed.ttft_breakdown()["outside_engine_ms"] == 3.0
    assert RequestResult(wall_ms=1.0, prompt_tokens=9, cached_tokens=0, output_tokens=1).ttft_breakdown() is None
    # a condition's means: (1.0 + 3.0) / 2 = 2.0 outside, the other parts equal; they add up to the mean TTFT 11.0
    trials = [{"ttft_ms": 10.0, "ttft_breakdown_ms": offline.ttft_breakdown()},
              {"ttft_ms": 12.0, "ttft_breakdown_ms": streamed.ttft_breakdown()}]
    means = analysis.breakdown_means(trials)
    assert means == {"outside_engine_ms": 2.0, "frontend_ipc_ms": 2.5, "queue_ms": 0.5, "prefill_step_ms": 6.0}
    assert sum(means.values()) == approx(11.0)
    assert analysis.breakdown_means(trials + [{"ttft_ms": 5.0, "ttft_breakdown_ms": None}]) is None


def test_one_request_s_own_times_from_the_server_s_histograms():
    from prefix_cache_bench import prometheus
    # two engines' /metrics: counts and sums (s, tokens) add up over engines: 3 + 1 = 4 observations,
    # TTFT 0.06 + 0.04 = 0.10 s, prompt tokens 300 + 100 = 400, output tokens 30 + 10 = 40
    text = "".join(f"{name}_count{{{{engine=\"{{e}}\"}}}} {{n}}\n{name}_sum{{{{engine=\"{{e}}\"}}}} {{{key}}}\n"
                   for name, key in (("vllm:time_to_first_token_seconds", "t"), ("vllm:request_queue_time_seconds", "q"),
                                     ("vllm:request_prefill_time_seconds", "p"), ("vllm:request_prompt_tokens", "pt"),
                                     ("vllm:request_generation_tokens", "ot")))
    engines = [prometheus.parse_metrics(text.format(e=0, n=3, t=0.06, q=0.0015, p=0.03, pt=300, ot=30)),
               prometheus.parse_metrics(text.format(e=1, n=1, t=0.04, q=0.0005, p=0.01, pt=100, ot=10))]
    before = prometheus.request_time_totals(engines)
    assert before == {"engine_ttft_ms": (4, approx(0.10)), "queue_ms": (4, approx(0.002)), "prefill_ms": (4, approx(0.04)),
                      "prompt_tokens": (4, 400), "output_tokens": (4, 40)}
    # one request more, of 785 prompt and 8 output tokens: TTFT 0.1125 - 0.100 = 12.5 ms, queue
    # 0.0025 - 0.002 = 0.5 ms, prefill 0.048 - 0.040 = 8.0 ms
    after = {"engine_ttft_ms": (5, 0.1125), "queue_ms": (5, 0.0025), "prefill_ms": (5, 0.048),
             "prompt_tokens": (5, 1185), "output_tokens": (5, 48)}
    times = prometheus.one_request_times(before, after, 785, 8)
    assert times == {"engine_ttft_ms": approx(12.5), "queue_ms": approx(0.5), "prefill_ms": approx(8.0)}
    # another client's one request in between, of other lengths: not ours
    assert prometheus.one_request_times(before, after, 273, 8) is None
    assert prometheus.one_request_times(before, after, 785, 1) is None
    # two requests in between, or a server without one of the histograms: no single request's times
    assert prometheus.one_request_times(before, {**after, "queue_ms": (6, 0.003)}, 785, 8) is None
    missing = {k: v for k, v in before.items() if k != "queue_ms"}
    assert prometheus.one_request_times(missing, {k: v for k, v in after.items() if k != "queue_ms"}, 785, 8) is None
    assert prometheus.request_time_totals([{}]) == {}


def test_host_speed_figure_is_a_best_of_fixed_work(monkeypatch):
    from prefix_cache_bench import host
    # the best of the repeats: perf_counter advances 5, 3, 4 s across the three repeats -> 3000 ms
    ticks = iter([0.0, 5.0, 10.0, 13.0, 20.0, 24.0])
    monkeypatch.setattr(host.time, "perf_counter", lambda: next(ticks))
    assert host.python_loop_ms(iterations=10, repeats=3) == 3000.0
    monkeypatch.undo()
    info = host.machine_info()
    assert info["host_python_loop_ms"] > 0 and info["host_python_loop_iterations"] == host.HOST_LOOP_ITERATIONS
    assert info["cpu_logical_cores"] == os.cpu_count()


# a small shape: 1000 parameters, 200 of them embedding; hidden 10, vocab 20, 2 layers, 2 heads,
# 1 KV head of 4 dims, bf16 (2 bytes)
SHAPE = {"num_parameters": 1000, "num_embedding_parameters": 200, "hidden_size": 10, "vocab_size": 20,
         "num_layers": 2, "num_attention_heads": 2, "num_kv_heads": 1, "head_dim": 4, "dtype": "bfloat16"}


def test_gpu_floor_by_hand():
    from prefix_cache_bench.prefill_fit import gpu_floor
    # 3 new tokens behind 5 cached. Bytes: weights 1000 - 200 + 10 x 20 = 1000, K and V 2 x 2 layers
    # x 1 x 4 = 16 a token for 8 tokens = 128; 2 x 1128 = 2256 bytes. FLOPs: 2 x 800 x 3 = 4800, attention
    # keys 3 x 5 + 3 x 4 / 2 = 21, 4 x 2 x 2 x 4 x 21 = 1344, LM head 2 x 10 x 20 = 400: 6544.
    floor = gpu_floor(SHAPE, "NVIDIA H200", 3, 5)
    assert floor["bytes_read"] == 2256 and floor["flops"] == 6544
    assert floor["memory_ms"] == approx(2256 / 4.8e12 * 1e3) and floor["compute_ms"] == approx(6544 / 989e12 * 1e3)
    assert floor["bound"] == "memory" and floor["floor_ms"] == floor["memory_ms"]
    # two tensor-parallel GPUs share both; an unknown device or no shape: no floor
    assert gpu_floor(SHAPE, "NVIDIA H200", 3, 5, gpus=2)["floor_ms"] == approx(floor["floor_ms"] / 2)
    assert gpu_floor(SHAPE, "AMD EPYC (CPU)", 3, 5) is None and gpu_floor(None, "NVIDIA H200", 3, 5) is None


def test_anatomy_table_cells():
    parts = {"outside_engine_ms": 1.0, "frontend_ipc_ms": 2.5, "queue_ms": 0.5, "prefill_step_ms": 6.0}
    data = {"environment": {"device": "NVIDIA H200", "model_shape": SHAPE},
            "cache_hit": {"stats": {"ttft_mean": 10.0, "prompt_tokens": 8, "cached_tokens": 5,
                                    "ttft_breakdown_mean_ms": parts}}}
    table = tables.anatomy_table({(4, 3): data}).splitlines()
    assert table[0] == ("| config | condition | TTFT ms | outside the engine | frontend + IPC | queue | prefill step "
                        "| GPU floor ms | TTFT / floor |")
    # floor 2256 bytes / 4.8 TB/s = 4.7e-7 ms, shown to 2 decimals; 10.0 / 4.7e-7 = 21276595.7x
    assert table[2] == "| A=4 / B=3 | hit | 10.00 | 1.00 | 2.50 | 0.50 | 6.00 | 0.00 (memory) | 21276595.7x |"
    assert tables.anatomy_table({(4, 3): {"cache_hit": {"stats": {"ttft_mean": 10.0}}}}) is None
