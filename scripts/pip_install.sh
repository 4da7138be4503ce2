#!/usr/bin/env bash
# pip install with visible progress for the long llama.cpp compile: pip's verbose build output
# is filtered down to the compiler's [n/total] steps, so the wait shows how far it has come.
set -eo pipefail
python=$1; shift
"$python" -m pip install --progress-bar on -v "$@" 2>&1 \
  | grep --line-buffered -E '^\s*\[ *[0-9]+/[0-9]+\]|^Successfully|^Requirement already|ERROR|^error|Building wheel|Collecting' \
  | sed -u -E 's/^\s*(\[ *[0-9]+\/[0-9]+\]).*/  llama.cpp build step \1/' || {
    status=$?
    echo "pip install failed (exit $status); rerun without the filter for the full log: $python -m pip install $*" >&2
    exit $status
  }
