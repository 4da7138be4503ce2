"""`weights`: a llama_cpp model loads a copy of its file re-quantized once (Q4_1 has no batched CPU kernels, Q8_0
has), kept beside the file or in the user's cache, and the file itself wherever no copy can be made."""

import dataclasses
import logging
import os

import pytest

from chat.engine.backends.llama_cpp import LlamaCppBackend, _llama
from chat.engine.gguf_metadata import read_gguf_metadata
from chat.engine.types import ModelSpec
from chat.engine.backends.weights import COPY_FOLDER
from chat.engine.backends.weights import weights_path as path_for
from llmsite.config import ConfigError, load_config
from tests.factories import write_tiny_gguf

LLAMA_FTYPE_MOSTLY_Q8_0 = 7


def weights_path(spec: ModelSpec) -> str:
    return path_for(_llama(), spec)


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "models"
    folder.mkdir()
    return ModelSpec(name="tiny", path=str(write_tiny_gguf(folder / "tiny.gguf")), weights="q8_0", context_length=256,
                     parallel=2)


def test_the_copy_is_made_once_beside_the_file_and_loaded(model, monkeypatch):
    path = weights_path(model)
    assert os.path.dirname(path) == os.path.join(os.path.dirname(model.path), COPY_FOLDER)
    assert read_gguf_metadata(path)["general.file_type"] == LLAMA_FTYPE_MOSTLY_Q8_0
    monkeypatch.setattr("chat.engine.backends.weights.quantize_file", lambda *a, **k: pytest.fail("written twice"))
    assert weights_path(model) == path
    backend = LlamaCppBackend.load(model)
    try:
        assert backend.tokenize("Hello there") and backend.context_length == 256
    finally:
        backend.close()


def test_a_replaced_file_gets_a_new_copy_and_the_old_one_goes(model):
    first = weights_path(model)
    write_tiny_gguf(model.path, seed=7)
    os.utime(model.path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    other_models_copy = os.path.join(os.path.dirname(first), "tiny.q8_0.q8_0.0123456789ab.gguf")  # "tiny.q8_0.gguf"'s
    open(other_models_copy, "wb").close()
    stale = os.path.join(os.path.dirname(first), "tiny.q8_0.0123456789ab.gguf.99-1.partial")  # a writer that died
    open(stale, "wb").close()
    os.utime(stale, (1, 1))
    second = weights_path(model)
    assert second != first and os.path.exists(second) and not os.path.exists(first)
    assert os.path.exists(other_models_copy) and not os.path.exists(stale)


def test_a_copy_that_does_not_load_is_removed_and_the_file_loads(model):
    copy = weights_path(model)
    with open(copy, "r+b") as file:
        file.truncate(4096)  # cut short, as by a crash
    backend = LlamaCppBackend.load(model)
    try:
        assert backend.tokenize("Hello")
    finally:
        backend.close()
    assert not os.path.exists(copy)


def test_files_of_the_same_name_in_two_read_only_folders_keep_their_own_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copies = []
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / COPY_FOLDER).write_text("not a folder")  # as if read-only
        spec = ModelSpec(name=folder, path=str(write_tiny_gguf(tmp_path / folder / "model.gguf", seed=seed)),
                         weights="q8_0")
        copies.append(weights_path(spec))
    assert copies[0] != copies[1] and all(os.path.exists(copy) for copy in copies)


def test_without_a_home_folder_the_copy_goes_beside_the_file(model, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr("pathlib.Path.home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert os.path.basename(os.path.dirname(weights_path(model))) == COPY_FOLDER


def test_a_read_only_model_folder_keeps_the_copy_in_the_user_cache(model, tmp_path):
    (tmp_path / "models" / COPY_FOLDER).write_text("not a folder")  # mkdir fails there, as on a read-only mount
    path = weights_path(model)
    assert path.startswith(str(tmp_path / "cache" / "llmsite" / "weights"))
    assert read_gguf_metadata(path)["general.file_type"] == LLAMA_FTYPE_MOSTLY_Q8_0


def test_without_any_place_for_a_copy_the_file_loads_as_it_is(model, tmp_path, caplog):
    (tmp_path / "models" / COPY_FOLDER).write_text("not a folder")
    (tmp_path / "cache").write_text("not a folder either")
    with caplog.at_level(logging.WARNING, logger="chat.engine.backends.weights"):
        assert weights_path(model) == model.path
    assert "as it is" in caplog.text


def test_on_a_gpu_or_already_of_that_type_the_file_itself(model):
    assert weights_path(dataclasses.replace(model, gpu_layers=4)) == model.path
    copy = weights_path(model)
    assert weights_path(dataclasses.replace(model, path=copy)) == copy
    assert weights_path(dataclasses.replace(model, weights="")) == model.path


@pytest.mark.parametrize(("line", "message"), [
    ("weights: q9_9", "weights must be one of"),
    ("weights: 8", "weights must be a weight type"),
    ("weights: q8_0\nbackend: ctransformers", "with the llama_cpp backend"),
    ("weights: Q9_9", "weights must be one of"),
])
def test_a_bad_weights_setting_is_a_config_error(tmp_path, line, message):
    config = tmp_path / "config.yaml"
    config.write_text(f"model_path: m.gguf\nsystem_prompt: Hi.\n{line}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(config, base_dir=tmp_path)


def test_the_type_is_read_in_any_case(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model_path: m.gguf\nsystem_prompt: Hi.\nweights: ' Q8_0'\n")
    assert load_config(config, base_dir=tmp_path).models[0].weights == "q8_0"
