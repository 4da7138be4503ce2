"""Sampling under a grammar without filtering the whole vocabulary at every token (llama_cpp backend).

A grammar sampler checks each candidate against the grammar's state: on the full vocabulary
(49,152 tokens for SmolLM2) that halves decode speed. As llama.cpp's own common sampler does, the
token is first sampled without the grammar and then checked alone; only when the grammar rejects
it are candidates filtered and the token sampled again: the SHORTLIST most likely ones first, the
whole vocabulary only when the grammar allows none of them (a filter's cost grows with the grammar's
open alternatives; on the whole vocabulary a large enum held the scheduler thread for seconds). For
greedy decoding the result is the token whole-vocabulary filtering gives (tested).

A token the grammar rejects is never passed to llama_sampler_accept: llama.cpp throws a C++
exception there (or aborts, for an end-of-generation token), which through ctypes ends the process.
When the grammar allows no candidate at all, the sequence fails with GrammarDeadEnd instead.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from ..errors import InvalidRequest


SHORTLIST = 512  # candidates a rejected token's resampling filters first (_sample_allowed)
# A reply's grammar work runs on the scheduler's thread, where every stream of the model waits for it. Some grammars
# within the converter's limits are ambiguous enough that llama.cpp's sampler takes 0.1-3 s a token (measured:
# ((a{1,20}){10,20}){10,20}, before such nestings were refused; overlapping alternatives may do the same). A reply
# may spend this much CPU on its grammar, plus this much per token (a large enum takes ~1.5 ms), then fails.
GRAMMAR_SECONDS_FIRST = 0.5
GRAMMAR_SECONDS_PER_TOKEN = 0.01


class GrammarDeadEnd(InvalidRequest):
    """The grammar allows none of the model's tokens here (e.g. a character no token can spell)."""

    def __init__(self):
        super().__init__("The grammar allows no token of this model at this point of the reply; "
                         "the reply was stopped. Check the grammar or the response format.")


class GrammarTooCostly(InvalidRequest):
    """Following the grammar took more of the scheduler's CPU than a reply may (GRAMMAR_SECONDS_*)."""

    def __init__(self):
        super().__init__("Following this response format or tool schema took too long at each token (a pattern "
                         "or alternatives that match the same text in many ways?); the reply was stopped.")


class ConstrainedSampler:
    """Candidate buffers for one model (used from the scheduler thread only)."""

    def __init__(self, llama, n_vocab: int):
        self._llama = llama
        self._n_vocab = n_vocab
        self._candidates = (llama.llama_token_data * n_vocab)()
        self._view = np.frombuffer(self._candidates, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = (llama.llama_token_data * 1)()
        self._short_buffer = (llama.llama_token_data * SHORTLIST)()
        self._short = np.frombuffer(self._short_buffer, dtype=self._view.dtype)

    def sample(self, *, context, index: int, chain, grammar) -> int:
        """Sample batch row `index` with `chain` (no grammar in it) under `grammar`; both accept the token."""
        llama = self._llama
        candidates = self._fill(context, index)
        llama.llama_sampler_apply(chain, ctypes.byref(candidates))
        token = candidates.data[candidates.selected].id
        if not self._allowed(grammar, token):
            token = self._sample_allowed(context, index, chain, grammar)
        llama.llama_sampler_accept(grammar, token)
        llama.llama_sampler_accept(chain, token)
        return token

    def _sample_allowed(self, context, index: int, chain, grammar) -> int:
        """Sample among the tokens the grammar allows: first among the SHORTLIST most likely ones, the whole
        vocabulary only when the grammar allows none of those. Filtering costs candidates × the grammar's open
        alternatives: with a 60,000-value enum, one filter of the whole vocabulary held the scheduler thread
        (every stream) for seconds. Tokens outside the shortlist are left out only when a more likely token is
        allowed; sampling's top-k/top-p would cut nearly all of them anyway."""
        llama = self._llama
        candidates = self._fill(context, index)
        if self._n_vocab > SHORTLIST:
            best = np.argpartition(self._view["logit"], self._n_vocab - SHORTLIST)[self._n_vocab - SHORTLIST:]
            self._short[:] = self._view[best]
            shortlist = llama.llama_token_data_array(
                data=ctypes.cast(self._short_buffer, ctypes.POINTER(llama.llama_token_data)), size=SHORTLIST,
                selected=-1, sorted=False)
            llama.llama_sampler_apply(grammar, ctypes.byref(shortlist))
            token = self._pick(shortlist, chain, grammar) if np.isfinite(self._short["logit"]).any() else None
            if token is not None:
                return token
            candidates = self._fill(context, index)
        llama.llama_sampler_apply(grammar, ctypes.byref(candidates))
        token = self._pick(candidates, chain, grammar)
        if token is None:
            raise GrammarDeadEnd()  # the grammar allows none of the model's tokens here
        return token

    def _pick(self, candidates, chain, grammar) -> int | None:
        """The chain's choice among the filtered candidates; None when it chose a token no one may write (all
        were rejected by the grammar or banned by logit_bias)."""
        self._llama.llama_sampler_apply(chain, ctypes.byref(candidates))
        if candidates.selected < 0:
            return None
        chosen = candidates.data[candidates.selected]
        # The grammar is asked again, not inferred from the logit: a token it rejects must never be accepted.
        if chosen.logit == -math.inf or not self._allowed(grammar, chosen.id):
            return None
        return chosen.id

    def _fill(self, context, index: int):
        logits = self._llama.llama_get_logits_ith(context, index)
        self._view["id"] = self._ids
        self._view["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        self._view["p"] = 0.0
        return self._llama.llama_token_data_array(
            data=ctypes.cast(self._candidates, ctypes.POINTER(self._llama.llama_token_data)),
            size=self._n_vocab, selected=-1, sorted=False)

    def _allowed(self, grammar, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        single = self._llama.llama_token_data_array(
            data=ctypes.cast(self._one, ctypes.POINTER(self._llama.llama_token_data)), size=1, selected=-1, sorted=False)
        self._llama.llama_sampler_apply(grammar, ctypes.byref(single))
        return not math.isinf(self._one[0].logit)
