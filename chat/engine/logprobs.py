"""Token log-probabilities: computed from a logits row, and handed out with the text that carries each token."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit for top_logprobs


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step."""

    token: str
    logprob: float
    bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability under the model's distribution at that step, and the likeliest tokens."""

    token: str
    logprob: float
    bytes: bytes  # what the token added to the reply (empty for control tokens)
    top: tuple[TopLogprob, ...] = ()


def log_softmax_top(logits, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under log-softmax(`logits`), and the `top` likeliest (id, log-probability),
    most likely first. `logits` is one row of raw logits (before penalties, grammar or temperature)."""
    import numpy  # a dependency of llama-cpp-python; imported only when someone asks for logprobs

    row = numpy.asarray(logits, dtype=numpy.float64)  # a float64 sum over ~50k terms keeps the normaliser exact
    peak = row.max()
    normaliser = peak + numpy.log(numpy.exp(row - peak).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        top = min(top, row.size)
        ids = numpy.argpartition(row, -top)[-top:]
        ids = ids[numpy.argsort(-row[ids], kind="stable")]
        best = [(int(i), float(row[i] - normaliser)) for i in ids]
    return float(row[token] - normaliser), best


class LogprobTrack:
    """Releases each token's logprobs together with the text delta that completes the token's bytes.

    Text is held back by the TextAssembler (an incomplete UTF-8 character, a possible stop string), so a
    token's record waits until the reader has been given all of its bytes: the records handed out with a
    reply's deltas then line up with its text.
    """

    def __init__(self):
        self._waiting: deque[tuple[TokenLogprob, int, int]] = deque()  # record, first byte, end byte
        self._generated = 0  # bytes of every token so far
        self._emitted = 0  # bytes of text handed to the reader
        self.released: list[TokenLogprob] = []

    def add(self, record: TokenLogprob, size: int) -> None:
        """A sampled token that added `size` bytes to the generated text."""
        self._waiting.append((record, self._generated, self._generated + size))
        self._generated += size

    def release(self, delta: str) -> list[TokenLogprob]:
        """The records whose bytes `delta` (the text just emitted) completes."""
        self._emitted += len(delta.encode("utf-8"))
        out = []
        while self._waiting and self._waiting[0][2] <= self._emitted:
            out.append(self._waiting.popleft()[0])
        self.released.extend(out)
        return out

    def finish(self, delta: str) -> list[TokenLogprob]:
        """At the end, with the last delta: the records of tokens that begin inside the text. A stop string may
        have cut the text inside the last of them; tokens wholly within the cut-off part are dropped."""
        self._emitted += len(delta.encode("utf-8"))
        out = [record for record, first, end in self._waiting if first < self._emitted or end <= self._emitted]
        self._waiting.clear()
        self.released.extend(out)
        return out
