#!/usr/bin/env bash
# pip install with visible progress for the long llama.cpp compile: pip's verbose build output
# is filtered down to the compiler's [n/total] steps, so the wait shows how far it has come.
# PIP_COMMAND=wheel builds wheels instead of installing (scripts/build_llama_wheel.sh).
set -eo pipefail
python=$1; shift
command=${PIP_COMMAND:-install}
"$python" -m pip "$command" --progress-bar on -v "$@" 2>&1 \
  | grep --line-buffered -E '^\s*\[ *[0-9]+/[0-9]+\]|^Successfully|^Requirement already|ERROR|^error|Building wheel|Collecting|Saved' \
  | sed -u -E 's/^\s*(\[ *[0-9]+\/[0-9]+\]).*/  llama.cpp build step \1/' || {
    status=$?
    echo "pip install failed (exit $status); rerun without the filter for the full log: $python -m pip $command $*" >&2
    exit $status
  }
