"""A run's settings (prefix_cache_bench/settings.py): frozen, every check between flags made when
they are built, from the flags or directly, and the same values either way."""
import dataclasses

import pytest

import phase1_experiment as p1
from prefix_cache_bench import cli, defaults
from prefix_cache_bench.errors import EXIT_USAGE, ExperimentError
from prefix_cache_bench.settings import (FleetSettings, LoadSettings, Phase1Settings, RunSettings, ServerSettings,
                                         TraceSettings)


def refused(build, needle):
    with pytest.raises(ExperimentError) as caught:
        build()
    assert caught.value.exit_code == EXIT_USAGE and needle in str(caught.value)


def test_settings_are_frozen():
    run = RunSettings(configs=((512, 256),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.num_trials = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoadSettings().repeats = 1


def test_a_run_that_nothing_would_time_is_refused_however_it_is_built():
    """The discarded round times a run without --num-trials: a library caller cannot skip both."""
    refused(lambda: RunSettings(configs=((512, 256),), warmup_trials=0), "--warmup-trials 0 needs --num-trials")
    assert RunSettings(configs=((512, 256),), warmup_trials=0, num_trials=3).num_trials == 3
    refused(lambda: RunSettings(configs=((512, 256),), block_order=True, processes=2), "--block-order runs in one process")
    refused(lambda: RunSettings(configs=((512, 256), (512, 256))), "listed twice")


def test_phase2_flags_resolve_the_run_shape_by_how_many_processes_measure():
    ours = cli.experiment_parser()
    flags, _ = ours.parse_known_args([])
    several = RunSettings.from_flags(flags, seed=0)
    assert (several.processes, several.num_blocks, several.min_block_seconds) == \
        (defaults.PROCESSES, defaults.NUM_BLOCKS, defaults.MIN_BLOCK_SECONDS)
    assert several.configs == ((defaults.CONTEXT_SIZE_A, defaults.CONTEXT_SIZE_B),)
    flags, _ = ours.parse_known_args(["--processes", "1", "--sizes", "256x128,512x128"])
    one = RunSettings.from_flags(flags, seed=0)
    assert (one.processes, one.num_blocks, one.min_block_seconds) == \
        (1, defaults.ONE_PROCESS_NUM_BLOCKS, defaults.ONE_PROCESS_MIN_BLOCK_SECONDS)
    assert one.configs == ((256, 128), (512, 128))
    flags, _ = ours.parse_known_args(["--block-order"])
    assert RunSettings.from_flags(flags, seed=0).processes == 1
    flags, _ = ours.parse_known_args(["--sizes", "256x128", "--size-a", "300"])
    refused(lambda: RunSettings.from_flags(flags, seed=0), "--sizes cannot be combined")


def test_phase1_flags_become_one_settings_object_of_its_parts():
    settings, vllm_flags, trace_requests = p1.parse_args(
        ["--base-url", "http://h:8000", "--size-a", "1000", "--concurrency", "1,4", "--num-prefixes", "3",
         "--slo-ttft-ms", "250", "--replica-urls", "http://a:1,http://b:2"])
    assert vllm_flags == [] and trace_requests is None and settings.trace is None and settings.fleet is None
    assert settings.server == ServerSettings(base_url="http://h:8000", replica_urls=("http://a:1", "http://b:2"))
    assert settings.load == LoadSettings(document_tokens=1000, concurrency=(1, 4), num_prefixes=(3,), slo_ttft_ms=250.0)
    assert not settings.load.working_set
    assert (settings.run.processes, settings.run.num_blocks) == (1, defaults.SERVER_NUM_BLOCKS)
    fleet, _, _ = p1.parse_args(["--replicas", "2", "--router", "dp", "--concurrency", "2"])
    assert fleet.fleet == FleetSettings(replicas=2, router="dp", router_policies=("dp",))


def test_checks_between_parts_hold_for_settings_built_directly():
    run, server = RunSettings(configs=()), ServerSettings()
    refused(lambda: Phase1Settings(run, server, fleet=FleetSettings(replicas=2)), "a fleet is measured under load")
    refused(lambda: Phase1Settings(run, ServerSettings(base_url="http://h:1"), load=LoadSettings(),
                                   fleet=FleetSettings(replicas=2)), "--replicas starts a fleet")
    refused(lambda: Phase1Settings(run, server, load=LoadSettings(), trace=TraceSettings(path="t.jsonl")),
            "a trace replay sends the trace's own requests")
    refused(lambda: LoadSettings(concurrency=(1,), request_rate=(2.0,)), "either --concurrency or --request-rate")
    refused(lambda: LoadSettings(concurrency=(1, 2), num_prefixes=(1, 4)), "a working-set sweep")
    refused(lambda: FleetSettings(replicas=2, router_policies=("fastest",)), "--router-policy 'fastest'")
    refused(lambda: ServerSettings(replica_urls=("http://a:1",)), "--replica-urls names the servers behind --base-url")
    refused(lambda: ServerSettings(base_url="localhost:8000"), "--base-url must look like http://host:port")
