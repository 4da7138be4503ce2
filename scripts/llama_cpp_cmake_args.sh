#!/usr/bin/env bash
# CMake arguments every llama.cpp build of this project gets (llama-cpp-python's wheel and llama-server).
#
# -fno-dse: GCC 12 drops the stores that fill the AMX tile configuration in ggml-cpu/amx/mmq.cpp (its
# _tile_loadconfig intrinsic does not declare that it reads the 64-byte configuration), so ldtilecfg loads stack
# garbage and the process dies at the first multiply of several rows on CPUs with AMX. Without dead-store
# elimination the stores stay; elsewhere the flag changes no measured speed (docs/BENCHMARKS.md, "CPUs with AMX").
# chat/engine/backends/amx.py still probes each build before the engine repacks weights for AMX.
echo "-DCMAKE_CXX_FLAGS=-fno-dse"
