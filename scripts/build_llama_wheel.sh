#!/usr/bin/env bash
# Build the pinned llama-cpp-python wheel with this project's CMake arguments, once per machine.
#
# pip caches a wheel it built from the sdist under the sdist's name only, whatever CMAKE_ARGS were, so a machine
# that built it before with other arguments would keep installing that build. This script keeps its own wheel,
# keyed by version and arguments:
#   ${XDG_CACHE_HOME:-~/.cache}/llmsite/wheels/llama-cpp-python-<version>-<args hash>/
# The last line on stdout is the wheel's path. Usage: scripts/build_llama_wheel.sh PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
python=$1
version=$(sed -nE 's/^llama-cpp-python==([0-9][^ ;#]*).*/\1/p' requirements.txt)
args=${CMAKE_ARGS:-}
key=$(printf '%s' "$args" | sha1sum | cut -c1-12)
dest=${XDG_CACHE_HOME:-$HOME/.cache}/llmsite/wheels/llama-cpp-python-$version-$key
mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9  # two setups at once build it once
wheel=$(ls "$dest"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "Building llama-cpp-python $version (CMAKE_ARGS: $args); about 7 minutes on 2 cores, once." >&2
  PIP_COMMAND=wheel bash scripts/pip_install.sh "$python" --no-deps --no-cache-dir --no-binary llama-cpp-python \
    --wheel-dir "$dest" "llama-cpp-python==$version" >&2
  wheel=$(ls "$dest"/llama_cpp_python-"$version"-*.whl | head -n 1)
fi
echo "$wheel"
