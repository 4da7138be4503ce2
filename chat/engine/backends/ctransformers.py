"""ctransformers 0.2.27 backend: Llama-2-era GGUF files with a SentencePiece vocabulary, one sequence at a time."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequest, ModelUnavailable, UnsupportedFeature
from ..gguf_metadata import NotGGUF, read_gguf_metadata
from ..sequence import Sequence
from ..types import ModelSpec, SamplingParams
from .base import PENALTY_LAST_N, Backend

logger = logging.getLogger(__name__)

# Token texts that end a turn in common chat formats; llama.cpp treats them as end-of-generation too.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
CONTROL, USER_DEFINED = 3, 4  # GGUF token types
PROMPT_BATCH_SIZE = 512  # ctransformers' default of 8 makes prompt evaluation needlessly slow
TOKENIZE_SPARE = 8  # token slots past one per byte of text: the leading space, a BOS
_SEED_STRIDE = 0x9E3779B1  # spreads per-step seeds apart (golden-ratio constant)


def _cannot_read(spec: ModelSpec, detail: str) -> ModelUnavailable:
    return ModelUnavailable(
        spec.name,
        spec.path,
        f"the ctransformers backend cannot read this file ({detail}); ctransformers 0.2.27 only reads "
        "Llama-2-era GGUF/GGML files with a SentencePiece vocabulary. Set `backend: llama_cpp` for this model.",
    )


@dataclass
class _SequenceState:
    to_evaluate: list[int]
    seed: int | None
    steps: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_seed(self) -> int:
        # ctransformers re-creates its RNG from the seed on every sample() call, so one fixed seed
        # would draw the same random number at every step; derive a fresh, reproducible one per step.
        self.steps += 1
        if self.seed is None:
            return self.rng.randrange(2**31)
        return (self.seed + self.steps * _SEED_STRIDE) % 2**31


class CTransformersBackend(Backend):
    name = "ctransformers"
    max_sequences = 1  # ctransformers has one context per model: requests are served in order

    @classmethod
    def load(cls, spec: ModelSpec) -> CTransformersBackend:
        if not Path(spec.path).is_file():
            raise ModelUnavailable(spec.name, spec.path, "the model file does not exist.")
        try:
            metadata = read_gguf_metadata(spec.path)
        except NotGGUF:
            metadata = {}  # maybe an old GGML file; let ctransformers decide
        tokenizer_model = metadata.get("tokenizer.ggml.model")
        if tokenizer_model not in (None, "llama"):
            pre = metadata.get("tokenizer.ggml.pre")
            raise _cannot_read(spec, f"its tokenizer is {tokenizer_model!r}" + (f" ({pre!r})" if pre else ""))

        from ctransformers.llm import LLM, Config

        threads = spec.threads or os.cpu_count() or 1
        config = Config(
            context_length=spec.context_length,
            gpu_layers=spec.gpu_layers,
            threads=threads,
            batch_size=PROMPT_BATCH_SIZE,
        )
        try:
            llm = LLM(spec.path, spec.model_type, config=config)
        except Exception:  # ctransformers only says "Failed to create LLM ..." without a reason
            logger.exception("ctransformers failed to load %s", spec.path)
            raise _cannot_read(spec, "it failed to load it") from None
        return cls(spec, llm, metadata, threads)

    def __init__(self, spec: ModelSpec, llm, metadata: dict, threads: int):
        self._llm = llm
        self._threads = threads
        trained = metadata.get(f"{metadata.get('general.architecture', 'llama')}.context_length")
        self.context_length = min(spec.context_length, llm.context_length, trained or spec.context_length)
        tokens: list[str] = metadata.get("tokenizer.ggml.tokens", [])
        types: list[int] = metadata.get("tokenizer.ggml.token_type", [])
        self._control_ids = {i for i, t in enumerate(types) if t == CONTROL}
        # ctransformers' tokenizer does not parse special tokens; we split them out ourselves.
        self._special_ids = {tokens[i]: i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED) and tokens[i]}
        # The tokens of a template's markup (client text is tokenized without them: chat/engine/prompt.py).
        self.control_tokens = dict(self._special_ids)
        self._special_pattern = (
            re.compile("(" + "|".join(map(re.escape, sorted(self._special_ids, key=len, reverse=True))) + ")")
            if self._special_ids
            else None
        )
        self.bos_token_id = llm.bos_token_id
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
        self.bos_text = tokens[self.bos_token_id] if 0 <= self.bos_token_id < len(tokens) else "<s>"
        eos = llm.eos_token_id
        self.eos_text = tokens[eos] if 0 <= eos < len(tokens) else "</s>"
        self._end_ids = {eos} | {i for text, i in self._special_ids.items() if text in END_OF_TURN_TEXTS}
        self.chat_template_source = metadata.get("tokenizer.chat_template")
        self._pieces: dict[int, bytes] = {}

    # -- any thread --------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        if not special or self._special_pattern is None:
            return self._tokenize_plain(text)
        tokens: list[int] = []
        for fragment in self._special_pattern.split(text):
            if fragment in self._special_ids:
                tokens.append(self._special_ids[fragment])
            elif fragment:
                # Known limitation: ctransformers' SentencePiece tokenizer always adds a leading space
                # to each fragment, also to the ones that follow a special token.
                tokens += self._tokenize_plain(fragment)
        return tokens

    def _tokenize_plain(self, text: str) -> list[int]:
        data = text.encode("utf-8", errors="replace")  # a lone surrogate (valid JSON) becomes "?"
        if not data:
            return []
        # Not LLM.tokenize: it sizes the buffer by characters, and the C side writes every token without a bound,
        # so text the vocabulary spells byte by byte (emoji: 4 tokens a character) overran it and crashed the
        # process. A token covers at least one byte; the spare room is for the leading space (and a BOS).
        buffer = (ctypes.c_int * (len(data) + TOKENIZE_SPARE))()
        count = self._llm.ctransformers_llm_tokenize(data, False, buffer)
        return buffer[:count]

    def detokenize(self, tokens: list[int]) -> str:
        if any(not 0 <= token < self._llm.vocab_size for token in tokens):
            raise InvalidRequest(f"Token ids must be from 0 to {self._llm.vocab_size - 1} for this model.",
                                 param="tokens")
        pieces = []
        for token in tokens:
            if token in self._control_ids:
                pieces.append(next((t for t, i in self._special_ids.items() if i == token), "").encode())
            else:
                pieces.append(self.token_bytes(token))
        text = b"".join(pieces).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text  # SentencePiece's word-start space of the first word

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = b"" if token in self._control_ids else self._llm.detokenize([token], decode=False)
            self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._end_ids

    def check_params(self, params: SamplingParams) -> None:
        if params.grammar is not None:
            raise UnsupportedFeature("Grammars (JSON mode) need the llama_cpp backend; this model uses ctransformers.")
        if params.logprobs is not None:
            raise UnsupportedFeature("logprobs need the llama_cpp backend; this model uses ctransformers.")
        if params.logit_bias:
            raise UnsupportedFeature("logit_bias needs the llama_cpp backend; this model uses ctransformers.")
        if params.presence_penalty or params.frequency_penalty:
            raise UnsupportedFeature(
                "Presence and frequency penalties need the llama_cpp backend; this model uses ctransformers."
            )

    # -- scheduler thread --------------------------------------------------------------------

    def start(self, seq: Sequence) -> None:
        with warnings.catch_warnings():  # reset() is "deprecated" only in favour of the high-level API
            warnings.simplefilter("ignore")
            self._llm.reset()
        seq.backend_state = _SequenceState(to_evaluate=list(seq.prompt_tokens), seed=seq.params.seed)
        seq.cached_prompt_tokens = 0

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        (seq,) = seqs
        state: _SequenceState = seq.backend_state
        params = seq.params
        self._llm.eval(state.to_evaluate, batch_size=PROMPT_BATCH_SIZE, threads=self._threads)
        greedy = params.greedy
        token = self._llm.sample(
            # Greedy = keep only the top token; temperature 0 would divide by zero in ctransformers.
            top_k=1 if greedy else (params.top_k or self._llm.vocab_size),
            top_p=1.0 if greedy else params.top_p,
            temperature=1.0 if greedy else params.temperature,
            repetition_penalty=params.repetition_penalty,
            last_n_tokens=PENALTY_LAST_N,
            seed=state.next_seed(),
        )
        state.to_evaluate = [token]
        return [(seq, token)]

    def release(self, seq: Sequence) -> None:
        seq.backend_state = None

    def close(self) -> None:
        llm, self._llm = self._llm, None
        del llm  # ctransformers frees the model in LLM.__del__
