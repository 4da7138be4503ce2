#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the sources vendored in the pinned llama-cpp-python sdist.
#
# It is the real peer of `make bench` and the real upstream of the remote-backend tests. The binary
# is kept outside the repository, keyed by the pinned version and the build's CMake arguments
# (scripts/llama_cpp_cmake_args.sh), so a second call returns at once:
#   ${XDG_CACHE_HOME:-~/.cache}/llmsite/llama-server-<version>-<args hash>/llama-server
# Beside it, cmake-args records those arguments (tests/llama_server.py reads whether the AMX fix is in).
# Progress goes to stderr; the last line on stdout is the binary's path, so callers can do
#   LLAMA_SERVER_BIN=$(scripts/build_llama_server.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -nE 's/^llama-cpp-python==([0-9][^ ;#]*).*/\1/p' requirements.txt)
if [ -z "$version" ]; then
  echo "build_llama_server: no 'llama-cpp-python==<version>' pin in requirements.txt" >&2
  exit 1
fi
# Any Python with pip can fetch the sdist; the project's venv has one even where the system's does not.
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/llmsite
fix_args=$(bash scripts/llama_cpp_cmake_args.sh)
dest=$cache_root/llama-server-$version-$(printf '%s' "$fix_args" | sha1sum | cut -c1-12)
binary=$dest/llama-server
jobs=${BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}

if [ -x "$binary" ]; then
  echo "llama-server $version already built: $binary" >&2
  echo "$binary"
  exit 0
fi

mkdir -p "$dest"
# Two callers at once (CI and a developer, or two test runs) must not compile twice into one tree.
exec 9>"$dest/.lock"
flock 9
if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi

started=$(date +%s)
work=$dest/work
rm -rf "$work"
mkdir -p "$work"
echo "Building llama-server from llama-cpp-python $version's llama.cpp sources." >&2
echo "The first build takes 10-15 minutes on 2 cores (longer on a busy machine); later calls reuse $binary." >&2

echo "[1/4] downloading the llama-cpp-python $version source distribution" >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$version" >&2
sdist=$(ls "$work"/llama_cpp_python-"$version".tar.gz)

echo "[2/4] unpacking vendor/llama.cpp" >&2
tar -xzf "$sdist" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp"
src=$work/llama_cpp_python-$version/vendor/llama.cpp

echo "[3/4] configuring (Release, static, CPU only, no curl/ssl, no tests, examples or web UI)" >&2
# Static libraries make the cached binary self-contained. The web UI is off so the build never
# tries to fetch prebuilt assets (machines here have no internet); the API needs no UI.
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake -S "$src" -B "$work/build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  $fix_args \
  >"$work/configure.log" 2>&1 || {
    echo "cmake configure failed; log: $work/configure.log" >&2
    tail -n 30 "$work/configure.log" >&2
    exit 1
  }

echo "[4/4] compiling the llama-server target with $jobs jobs" >&2
# Only the compiler's step counter is shown; the full log stays next to the build.
if ! cmake --build "$work/build" --target llama-server -j "$jobs" 2>&1 \
    | tee "$work/build.log" \
    | grep --line-buffered -E '^\[ *[0-9]+/[0-9]+\]|^\[ *[0-9]+%\]' \
    | sed -u -E 's/^(\[ *[0-9]+(\/[0-9]+|%)\]).*/  llama-server build step \1/' >&2; then
  :
fi
built=$(find "$work/build" -type f -name llama-server -perm -u+x | head -n 1)
if [ -z "$built" ]; then
  echo "llama-server build failed; log: $work/build.log" >&2
  grep -E 'error|Error' "$work/build.log" | tail -n 20 >&2 || true
  exit 1
fi

echo "$fix_args" >"$dest/cmake-args"
install -m 0755 "$built" "$binary.tmp"
mv "$binary.tmp" "$binary"
elapsed=$(( $(date +%s) - started ))
echo "$elapsed" >"$dest/build-seconds"
rm -rf "$work"
echo "llama-server $version built in $((elapsed / 60)) min $((elapsed % 60)) s: $binary" >&2
echo "$binary"
