"""llama-cpp-python's server (`python -m llama_cpp.server`) with the engine's weight layout.

Run as `python -m tests.llama_cpp_server ARGS...` from the repository root. On CPUs with AMX the
pinned llama.cpp's AMX repacking segfaults at the first decode of a quantized model, so the weights
stay in the plain CPU layout there, as chat/engine/backends/llama_cpp.py's model_params_for does.
"""

import runpy

import llama_cpp.llama_cpp as llama_low_level

_default_model_params = llama_low_level.llama_model_default_params


def _model_params():
    params = _default_model_params()
    if b"AMX_INT8 = 1" in llama_low_level.llama_print_system_info():
        params.use_extra_bufts = False
    return params


llama_low_level.llama_model_default_params = _model_params  # llama_cpp.Llama looks it up on each load

if __name__ == "__main__":
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
