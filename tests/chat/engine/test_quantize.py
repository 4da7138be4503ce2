"""quantize_model: llama.cpp's quantizer writes a smaller file that loads and generates."""

import pytest

from chat.engine import InvalidRequest, ModelRegistry, ModelSpec, ModelUnavailable, SamplingParams
from chat.engine.quantize import quantize_model, quantize_types


def test_quantized_tiny_model_loads_and_generates(tiny_gguf, tmp_path):
    out = quantize_model(tiny_gguf, tmp_path / "tiny-q4_0.gguf", "q4_0")
    assert out.exists() and out.stat().st_size < tiny_gguf.stat().st_size / 3
    assert not (tmp_path / "tiny-q4_0.gguf.partial").exists()
    registry = ModelRegistry([ModelSpec("q", str(out), context_length=128, parallel=1)])
    try:
        completion = registry.get().generate("hello world", SamplingParams(max_tokens=5, temperature=0))
        assert completion.completion_tokens > 0
    finally:
        registry.close()


def test_unknown_type_and_missing_source_are_clear_errors(tiny_gguf, tmp_path):
    assert {"q4_0", "q4_1", "q8_0", "f16"} <= set(quantize_types())
    with pytest.raises(InvalidRequest, match="q4_0"):
        quantize_model(tiny_gguf, tmp_path / "x.gguf", "q3_banana")
    with pytest.raises(ModelUnavailable):
        quantize_model(tmp_path / "nope.gguf", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
