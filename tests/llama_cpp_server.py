"""llama-cpp-python's server (`python -m llama_cpp.server`) with the engine's weight layout.

Run as `python -m tests.llama_cpp_server ARGS...` from the repository root. Weights are repacked for the CPU's
kernels only where the engine would repack them (chat/engine/backends/amx.py: some builds crash in their AMX
kernels), judged on the model named by `--model`.
"""

import runpy
import sys

import llama_cpp.llama_cpp as llama_low_level

from chat.engine.backends.amx import repacking_safe

_default_model_params = llama_low_level.llama_model_default_params


def _model_params():
    params = _default_model_params()
    model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv[:-1] else None
    params.use_extra_bufts = model is not None and repacking_safe(llama_low_level, model)
    return params


llama_low_level.llama_model_default_params = _model_params  # llama_cpp.Llama looks it up on each load

if __name__ == "__main__":
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
