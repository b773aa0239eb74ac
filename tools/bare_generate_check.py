"""How much of phase 2's TTFT is the tool itself: its request against a bare `llm.generate`.

    python tools/bare_generate_check.py --sizes 512x256,2048x256,8192x256 --rounds 30 [phase 2's flags]

One engine, started as phase2_experiment.py starts it (the same flags, the same parser). Each
config's [A, B] is warmed once; then, round after round, every config's hit, miss and cold
condition sends three requests with fresh queries: the tool's (offline_engine.OfflineEngine.request,
the path phase 2's measured rounds time), a bare one as a user writes it,

    t0 = time.perf_counter(); llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1))

and the same bare call with use_tqdm=False (no progress bar, as the tool calls it), each timed
the same way; their order rotates from round to round. Per config and condition: the three
means, the mean of the paired differences tool - bare and tool - quiet bare with their 95% t
intervals over the rounds, and whether the tool is within BUDGET_MS of the quiet bare call (the
same work as the tool's, less nothing but the progress bar a default call draws). Every
request's cached tokens are audited as phase 2 audits them. Writes --out (bare_generate_check.json).
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import phase2_experiment  # noqa: E402
from prefix_cache_bench.audit import expected_cached_tokens  # noqa: E402
from prefix_cache_bench.cli import take_flag  # noqa: E402
from prefix_cache_bench.defaults import CONDITIONS  # noqa: E402
from prefix_cache_bench.errors import ExperimentError, Interrupted, stop_on_signals  # noqa: E402
from prefix_cache_bench.intervals import mean_ci95  # noqa: E402
from prefix_cache_bench.offline_engine import OfflineEngine  # noqa: E402
from prefix_cache_bench.prompts import ConfigPrompts  # noqa: E402
from prefix_cache_bench.protocol import warm_cache  # noqa: E402
from prefix_cache_bench.host import machine_info  # noqa: E402
from prefix_cache_bench.provenance import provenance  # noqa: E402
from prefix_cache_bench.result_schema import build_bare_generate_check  # noqa: E402
from prefix_cache_bench.results import check_writable_dir, write_result  # noqa: E402

BUDGET_MS = 0.5         # the tool's TTFT within this of a bare generate's, at every size
PROG = "bare_generate_check.py"


def bare_generate_ms(llm, prompt_ids, cache_salt, **generate_args):
    """A bare LLM.generate of one token, as a user writes it: (wall ms, cached tokens)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=prompt_ids)
    if cache_salt is not None:              # the miss and cold conditions' namespace: nothing to reuse
        prompt["cache_salt"] = cache_salt
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(max_tokens=1), **generate_args)
    return (time.perf_counter() - t0) * 1e3, out[0].num_cached_tokens


def compare(llm, model, tokenizer, sizes, rounds, seed, pause_s, block):
    """Every config's conditions, the tool's request against a bare one, `rounds` pairs each.
    Returns (rows, problems): a row per config and condition; problems lists every request
    whose cached tokens broke its condition."""
    engine = OfflineEngine(llm, model)
    configs = [ConfigPrompts(tokenizer, a, b, block, seed, f"bare-{seed}") for a, b in sizes]
    for c in configs:
        warm_cache(engine.request, c.warmup_ids, pause_s)
    triples = {(k, condition): [] for k in range(len(configs)) for condition in CONDITIONS}
    problems = []
    for r in range(rounds):
        for k, c in enumerate(configs):
            for condition in CONDITIONS:
                prompts = dict(zip(ARMS, (*c.trial_prompts(condition, r), c.prompt(condition, f"{condition}-{r}-quiet"))))
                want = expected_cached_tokens(condition, len(c.warmup_ids), block)
                timed = {}
                for arm in ARMS[r % 3:] + ARMS[:r % 3]:           # each arm first in a third of the rounds
                    ids, salt = prompts[arm]
                    if arm == "tool":
                        result = engine.request(ids, 1, salt)
                        timed[arm] = (result.wall_ms, result.cached_tokens)
                    else:
                        timed[arm] = bare_generate_ms(llm, ids, salt, **({"use_tqdm": False} if arm == "quiet" else {}))
                    time.sleep(pause_s)
                problems += [f"A={c.size_a} B={c.size_b} {condition} round {r} {arm}: cached_tokens={cached}, "
                             f"expected {want}" for arm, (_, cached) in timed.items() if cached != want]
                triples[(k, condition)].append([timed[arm][0] for arm in ARMS])
    return [row(configs[k], condition, values) for (k, condition), values in triples.items()], problems


ARMS = ("tool", "bare", "quiet")


def difference(a, b):
    """The mean of the paired differences a - b, and its 95% t interval ([None, None] with one pair)."""
    diff = np.asarray(a) - np.asarray(b)
    return float(diff.mean()), list(mean_ci95(diff)) if len(diff) > 1 else [None, None]


def row(config, condition, values):
    """One config and condition's figures from its rounds' (tool, bare, quiet bare) TTFTs in ms."""
    tool_ms, bare_ms, quiet_ms = np.array(values).T
    diff, ci = difference(tool_ms, bare_ms)
    quiet_diff, quiet_ci = difference(tool_ms, quiet_ms)
    return {"context_size_a": config.size_a, "context_size_b": config.size_b, "condition": condition,
            "rounds": len(tool_ms), "tool_ttft_mean_ms": float(tool_ms.mean()), "bare_ttft_mean_ms": float(bare_ms.mean()),
            "quiet_bare_ttft_mean_ms": float(quiet_ms.mean()),
            "difference_mean_ms": diff, "difference_ci95": ci,
            "quiet_difference_mean_ms": quiet_diff, "quiet_difference_ci95": quiet_ci,
            "within_budget": bool(abs(quiet_diff) <= BUDGET_MS),
            "tool_ttft_ms": tool_ms.tolist(), "bare_ttft_ms": bare_ms.tolist(), "quiet_bare_ttft_ms": quiet_ms.tolist()}


def table(rows):
    """Markdown: per config and condition, the three means and the tool's differences."""
    cell = lambda mean, ci: f"{mean:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci[0] is not None else "")
    lines = ["| config | condition | tool TTFT ms | bare generate ms | bare, no progress bar ms | tool - bare ms (95% CI) | "
             f"tool - bare without the bar ms (95% CI) | within {BUDGET_MS:g} ms of it |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| A={r['context_size_a']} / B={r['context_size_b']} | {r['condition'].removeprefix('cache_')} | "
                     f"{r['tool_ttft_mean_ms']:.2f} | {r['bare_ttft_mean_ms']:.2f} | {r['quiet_bare_ttft_mean_ms']:.2f} | "
                     f"{cell(r['difference_mean_ms'], r['difference_ci95'])} | "
                     f"{cell(r['quiet_difference_mean_ms'], r['quiet_difference_ci95'])} | "
                     f"{'yes' if r['within_budget'] else 'no'} |")
    return "\n".join(lines)


def main(argv):
    from vllm import LLM

    rounds, argv = take_flag(argv, "--rounds", 20, int)
    out, argv = take_flag(argv, "--out", "bare_generate_check.json", str)
    if rounds < 2:
        raise ExperimentError("--rounds must be at least 2 (an interval needs two pairs)", 2)
    settings, engine_args = phase2_experiment.parse_args(argv)
    # its folder made and written to now, before an engine starts: not after the measured minutes
    check_writable_dir(os.path.dirname(out) or ".", "--out's folder")
    machine = machine_info()                    # the host's speed while no engine runs beside it
    phase2_experiment.check_model_fits(settings, engine_args)
    llm = LLM.from_engine_args(engine_args)
    try:
        cache_config = llm.llm_engine.vllm_config.cache_config     # the unit a prefix match counts in
        block = getattr(cache_config, "prefix_match_unit", None) or cache_config.block_size
        rows, problems = compare(llm, settings.model, llm.get_tokenizer(), settings.configs, rounds, settings.seed,
                                 settings.pause_ms / 1e3, block)
    finally:
        llm.llm_engine.engine_core.shutdown()
    import vllm
    result = build_bare_generate_check(experiment="bare_generate_check", model=settings.model, vllm_version=vllm.__version__,
                                       rounds=rounds, budget_ms=BUDGET_MS, rows=rows,
                                       cache_audit={"ok": not problems, "problems": problems},
                                       environment={"machine": machine,
                                                    **provenance(sys.argv[1:], "tools/bare_generate_check.py", __file__)})
    print(table(rows))
    write_result(out, result)
    print(f"wrote {out}")
    for problem in problems[:10]:
        print(f"!!! {problem}", file=sys.stderr)
    return 3 if problems else 0


if __name__ == "__main__":
    stop_on_signals()
    try:
        sys.exit(main(sys.argv[1:]))
    except (ExperimentError, Interrupted) as e:
        print(f"{PROG}: {'error: ' if isinstance(e, ExperimentError) else ''}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
