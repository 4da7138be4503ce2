"""Weights are repacked for AMX only where this build survives it (chat/engine/backends/amx.py): a child process
probes each (build, model file) once; a crash there keeps the engine on the plain kernels instead of killing it."""

import dataclasses
import json
import os
import signal
import sys
import time

import pytest

from chat.engine.backends import amx
from chat.engine.backends.llama_cpp import LlamaCppBackend, _llama, model_file_for
from chat.engine.types import ModelSpec

CRASHING_CHILD = [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"]


@pytest.fixture
def fresh_verdicts(tmp_path, monkeypatch):
    """No verdict in memory or on disk: the next question runs the probe."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(amx, "_verdicts", {})
    return tmp_path / "cache" / "llmsite" / "amx-probe.json"


@pytest.fixture
def llama():
    llama = _llama()
    if not amx.cpu_has_amx(llama):
        pytest.skip("this CPU has no AMX: llama.cpp never repacks for it, and nothing is probed")
    return llama


def test_this_build_passes_its_probe_and_the_engine_repacks_the_file_itself(llama, smollm2_gguf, fresh_verdicts):
    """The Makefile's build (scripts/llama_cpp_cmake_args.sh) survives AMX; so `weights: q8_0` needs no copy here
    (AMX kernels batch Q4_1) and the file loads as it is, repacked."""
    spec = ModelSpec("smol", str(smollm2_gguf), weights="q8_0")
    path, params = model_file_for(llama, spec)
    assert path == spec.path
    assert params.use_extra_bufts is True
    assert list(json.loads(fresh_verdicts.read_text()).values()) == [True]


def test_a_build_that_crashes_keeps_the_plain_layout_and_is_probed_once(llama, smollm2_gguf, fresh_verdicts,
                                                                         monkeypatch, caplog):
    monkeypatch.setattr(amx, "probe_command", lambda path: CRASHING_CHILD)
    assert amx.repacking_safe(llama, str(smollm2_gguf)) is False
    assert "crashes in its AMX kernels" in caplog.text
    path, params = model_file_for(llama, ModelSpec("smol", str(smollm2_gguf)))
    assert params.use_extra_bufts is False

    monkeypatch.setattr(amx, "_verdicts", {})  # a new process: the verdict on disk answers
    monkeypatch.setattr(amx, "probe_command", lambda path: pytest.fail("probed twice"))
    assert amx.repacking_safe(llama, str(smollm2_gguf)) is False


def test_a_replaced_model_file_is_probed_again(llama, smollm2_gguf, fresh_verdicts, tmp_path, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(smollm2_gguf.read_bytes())
    probed = []
    monkeypatch.setattr(amx, "probe_command", lambda path: probed.append(path) or CRASHING_CHILD)
    amx.repacking_safe(llama, str(model))
    model.write_bytes(smollm2_gguf.read_bytes() + b"\0")  # another size: another file
    amx.repacking_safe(llama, str(model))
    assert probed == [str(model), str(model)]


def test_files_amx_kernels_do_not_take_are_not_probed(llama, tiny_gguf, fresh_verdicts, monkeypatch):
    monkeypatch.setattr(amx, "probe_command", lambda path: pytest.fail("an F32 file was probed"))
    assert amx.repacking_safe(llama, str(tiny_gguf)) is True


def test_the_copy_is_skipped_only_where_amx_kernels_take_the_file(smollm2_gguf, tmp_path, monkeypatch):
    """Where weights are not repacked for AMX (no AMX, or a build that failed its probe), `weights: q8_0` still
    names the copy the engine loads (Q4_1's plain kernels multiply one row at a time)."""
    from chat.engine.backends.weights import weights_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "models" / "smol.gguf"
    model.parent.mkdir()
    model.symlink_to(smollm2_gguf)
    spec = ModelSpec("smol", str(model), weights="q8_0")
    assert weights_path(_llama(), spec, amx=True) == spec.path
    assert weights_path(_llama(), dataclasses.replace(spec, weights="q4_0"), amx=True) == spec.path
    copy = weights_path(_llama(), dataclasses.replace(spec, weights="q4_0"), amx=False)
    assert copy != spec.path and copy.endswith(".gguf")


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_loading_leaves_no_openmp_team_behind(llama, smollm2_gguf):
    """Repacking runs an OpenMP team in the loading thread; a team left alive beside the scheduler thread's makes
    libgomp throttle its spin-wait (one stream 32 against 245 tok/s measured), so the load runs in a thread that
    ends with it, taking its team along."""
    before = native_threads()
    backend = LlamaCppBackend.load(ModelSpec("smol", str(smollm2_gguf), parallel=1, context_length=256,
                                             side_prefill=False))
    try:
        deadline = time.monotonic() + 5
        while native_threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)  # the team's workers leave once their thread has ended
        assert native_threads() == before
    finally:
        backend.close()


def test_a_probe_that_cannot_start_keeps_the_plain_layout_and_is_tried_again(llama, smollm2_gguf, fresh_verdicts,
                                                                              monkeypatch, tmp_path):
    monkeypatch.setattr(amx, "probe_command", lambda path: [str(tmp_path / "no-such-interpreter")])
    assert amx.repacking_safe(llama, str(smollm2_gguf)) is False  # the load goes on, in the plain layout
    assert not fresh_verdicts.exists()  # no verdict on the build: the next start probes again
