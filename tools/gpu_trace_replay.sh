#!/usr/bin/env bash
# The GPU trace replays in results/h100-llama3.1-8b-shape-trace/, as they were run on the lent
# GPU box (vLLM from ../shared/gpu's pack on PYTHONPATH): a Llama-3.1-8B-shaped model with dummy
# weights, 20 s of the conversation trace from 1800 s at half its rate, outputs capped at 128
# tokens, three passes of each arm; first on HBM alone, then with a 48 GiB host-memory tier.
#   bash tools/gpu_trace_replay.sh OUT_DIR
set -u
out=${1:-/tmp/trace-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 tests/make_model.py /tmp/llama-3.1-8b --shape llama-3.1-8b > "$out/make_model.log" 2>&1
common=(--model /tmp/llama-3.1-8b --load-format dummy --trace traces/conversation_trace.jsonl.gz
        --trace-start-s 1800 --trace-duration-s 20 --time-scale 2 --trace-max-output-tokens 128 --repeats 3)
timeout 900 python3 phase1_experiment.py "${common[@]}" --results-dir "$out/hbm" > "$out/hbm.log" 2>&1
echo "hbm rc=$?" >> "$out/status"
timeout 900 python3 phase1_experiment.py "${common[@]}" --kv-offloading-size 48 --results-dir "$out/tier" > "$out/tier.log" 2>&1
echo "tier rc=$?" >> "$out/status"
