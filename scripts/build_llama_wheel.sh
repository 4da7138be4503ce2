#!/usr/bin/env bash
# Build the pinned llama-cpp-python wheel with this project's CMake arguments and llama.cpp patches, once per machine.
#
# pip caches a wheel it built from the sdist under the sdist's name only, whatever CMAKE_ARGS were, so a machine
# that built it before with other arguments would keep installing that build. This script keeps its own wheel,
# keyed by version, arguments, this script and the patches in scripts/llama_cpp_patches/ (applied to the sdist's
# vendored llama.cpp; see that folder's README.md):
#   ${XDG_CACHE_HOME:-~/.cache}/llmsite/wheels/llama-cpp-python-<version>-<args, script and patches hash>/
# The last line on stdout is the wheel's path. Usage: scripts/build_llama_wheel.sh PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
python=$1
version=$(sed -nE 's/^llama-cpp-python==([0-9][^ ;#]*).*/\1/p' requirements.txt)
args=${CMAKE_ARGS:-}
patches=(scripts/llama_cpp_patches/*.patch)
key=$( { printf '%s\n' "$args"; cat scripts/build_llama_wheel.sh "${patches[@]}"; } | sha1sum | cut -c1-12)
dest=${XDG_CACHE_HOME:-$HOME/.cache}/llmsite/wheels/llama-cpp-python-$version-$key
mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9  # two setups at once build it once
wheel=$(ls "$dest"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  command -v patch >/dev/null || { echo "build_llama_wheel: the 'patch' program is needed (apt-get install patch)" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "Downloading the llama-cpp-python $version source distribution." >&2
  "$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$version" >&2
  tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
  src=$work/llama_cpp_python-$version
  applied=()
  for patch_file in "${patches[@]}"; do
    echo "Applying $patch_file" >&2
    patch --batch --forward --quiet -p1 -d "$src" < "$patch_file"
    applied+=("\"$(basename "$patch_file" .patch)\",")
  done
  # The engine reads what the build carries (chat/engine/backends/llama_patches.py).
  printf '"""Written by scripts/build_llama_wheel.sh: the llama.cpp patches this build carries."""\nAPPLIED = (%s)\n' \
    "${applied[*]}" > "$src/llama_cpp/_llmsite_patches.py"
  echo "Building llama-cpp-python $version (CMAKE_ARGS: $args); about 7 minutes on 2 cores, once." >&2
  PIP_COMMAND=wheel bash scripts/pip_install.sh "$python" --no-deps --no-cache-dir --wheel-dir "$dest" "$src" >&2
  wheel=$(ls "$dest"/llama_cpp_python-"$version"-*.whl | head -n 1)
fi
echo "$wheel"
