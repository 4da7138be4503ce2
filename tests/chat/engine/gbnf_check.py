"""Feed text to llama.cpp's own grammar sampler (SmolLM2's vocabulary only, no weights): does GBNF accept it?"""

from __future__ import annotations

import ctypes
import math
import os


class GbnfChecker:
    """`parses(gbnf)`: llama.cpp parses the grammar; `accepts(gbnf, text)`: the grammar lets `text` be written."""

    def __init__(self, model_path):
        import llama_cpp as llama

        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        params.vocab_only = True
        self._llama = llama
        self._model = llama.llama_model_load_from_file(os.fsencode(str(model_path)), params)
        assert self._model, "could not load the vocabulary"
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._one = (llama.llama_token_data * 1)()

    def close(self) -> None:
        self._llama.llama_model_free(self._model)

    def parses(self, gbnf: str) -> bool:
        sampler = self._llama.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if sampler:
            self._llama.llama_sampler_free(sampler)
        return bool(sampler)

    def _tokens(self, text: str) -> list[int]:
        data = text.encode()
        buffer = (self._llama.llama_token * (len(data) + 8))()
        count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, len(buffer), False, True)
        assert count >= 0
        return list(buffer[:count])

    def _allowed(self, sampler, token: int) -> bool:
        llama = self._llama
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        single = llama.llama_token_data_array(data=ctypes.cast(self._one, ctypes.POINTER(llama.llama_token_data)),
                                              size=1, selected=-1, sorted=False)
        llama.llama_sampler_apply(sampler, ctypes.byref(single))
        return not math.isinf(self._one[0].logit)

    def accepts(self, gbnf: str, text: str) -> bool:
        """Every token of `text` is allowed in turn, and the grammar may end after it (end-of-generation allowed)."""
        llama = self._llama
        sampler = llama.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        assert sampler, "the grammar does not parse"
        try:
            for token in self._tokens(text):
                if not self._allowed(sampler, token):
                    return False
                llama.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, llama.llama_vocab_eos(self._vocab))
        finally:
            llama.llama_sampler_free(sampler)
