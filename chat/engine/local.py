"""The local engine: one model loaded in this process, served by its scheduler thread (tokens, chat template, submit).

Lifetime: the model is freed only after its last user. Every call that reaches the backend from a
request thread (tokenize, count_tokens, prompt_tokens, detokenize, submit) holds a use of the engine;
close() turns later calls into EngineClosed (a 503), waits for the uses in progress, and leaves the
freeing to the scheduler thread once it is out of its loop (chat/engine/scheduler.py).
"""

from __future__ import annotations

import logging
import threading
import uuid
from contextlib import contextmanager

from .backends import Backend
from .chat_template import ChatTemplate
from .errors import ContextOverflow, EngineClosed, InvalidRequest, ModelUnavailable
from .faults import Faults
from .generation import Generation
from .protocol import EngineProtocol
from .logprobs import LogprobTrack
from .prefix_cache import common_prefix_length
from .prompt import Prompt
from .scheduler import Scheduler
from .sequence import Sequence
from .text import TextAssembler
from .types import ModelSpec, SamplingParams

logger = logging.getLogger(__name__)

MAX_ADMISSION_WAIT = 60.0  # seconds a stream waits for its slot before its response starts, without queue_timeout


class Engine(EngineProtocol):
    """One loaded model and the scheduler thread that serves it. Thread-safe."""

    def __init__(self, spec: ModelSpec, backend: Backend):
        self.spec = spec
        self.context_length = backend.context_length
        self._backend = backend
        # A template set in the spec must compile (configuration error otherwise); the file's own
        # template falls back to ChatML if it does not.
        if spec.chat_template:
            from jinja2 import TemplateError

            try:
                self._template = ChatTemplate(spec.chat_template, bos_token=backend.bos_text, eos_token=backend.eos_text,
                                              control_texts=backend.control_tokens)
            except TemplateError as error:
                raise ModelUnavailable(spec.name, spec.path, f"its chat_template setting does not compile: {error}") from None
        else:
            self._template = ChatTemplate.for_model(
                backend.chat_template_source, bos_token=backend.bos_text, eos_token=backend.eos_text, model=spec.name,
                control_texts=backend.control_tokens,
            )
        self._uses = 0  # calls into the backend in progress from request threads
        self._closed = False
        self._lifetime = threading.Condition()
        faults = Faults.from_environment()
        self._scheduler = Scheduler(backend, spec.name, max_queue=spec.max_queue, queue_timeout=spec.queue_timeout,
                                    faults=faults)
        backend.faults = faults

    def __repr__(self) -> str:
        return f"<Engine {self.spec.name} ({self.spec.backend})>"

    @property
    def alive(self) -> bool:
        """False once the scheduler thread has died or stalled, or the engine was closed: the registry replaces it."""
        return not self._closed and self._scheduler.alive

    @property
    def faults(self) -> Faults | None:
        return self._scheduler.faults

    @faults.setter
    def faults(self, faults: Faults | None) -> None:
        """Test-only fault injection (chat/engine/faults.py)."""
        self._scheduler.faults = self._backend.faults = faults

    @contextmanager
    def _use(self):
        """Hold the engine open for one call into the backend; EngineClosed once close() has begun."""
        with self._lifetime:
            if self._closed:
                raise EngineClosed(f"Model {self.spec.name!r} was shut down; retry the request.")
            self._uses += 1
        try:
            yield self._backend
        finally:
            with self._lifetime:
                self._uses -= 1
                if not self._uses:
                    self._lifetime.notify_all()

    def tokenize(self, text: str, *, special: bool = True, exact: bool = False) -> list[int]:
        """Tokens of `text` without BOS; `special` parses control-token texts such as "<|im_end|>". Always exact
        (the model's own tokenizer)."""
        with self._use() as backend:
            return backend.tokenize(text, special=special)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as text (how message content and names are tokenized in a chat prompt)."""
        with self._use() as backend:
            return len(backend.tokenize(text, special=False))

    def detokenize(self, tokens: list[int]) -> str:
        with self._use() as backend:
            return backend.detokenize(list(tokens))

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, continue_final: bool = False,
                    shared_until: tuple[int, int] | None = None) -> Prompt:
        """Prompt text for `messages` ({"role", "content"} dicts) in the model's chat format; `tools` reach a
        template that supports them. Only the template's markup becomes control tokens (a Prompt knows which).
        `continue_final`: the last (assistant) message is left open for the model to extend. `shared_until`:
        (message index, characters of its content) where the site's own content ends, which any tenant's prompt
        may reuse."""
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                     continue_final=continue_final, shared_until=shared_until)

    @property
    def template_supports_tools(self) -> bool:
        return self._template.supports_tools

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The tokens `submit` would decode for `prompt`: BOS added only if the model wants one and it is missing.

        A rendered chat (`render_chat`'s Prompt) gives control tokens for the template's markup only; its
        text pieces are tokenized as text. A plain `str` (POST /v1/completions) is the raw prompt: its
        control-token texts are parsed."""
        return self._tokens_and_shared(prompt, count_shared=False)[0]

    def _tokens_and_shared(self, prompt: str, *, count_shared: bool = True) -> tuple[list[int], int]:
        """prompt_tokens, and how many of them are the site's own (Prompt.shared_pieces and shared_chars; BOS
        before them). Within a piece, the tokens its shared text alone begins with too: each of them spells site
        text. `count_shared` False: the tokens alone (composition measures a prompt several times)."""
        shared = 0
        with self._use() as backend:
            if isinstance(prompt, Prompt):
                controls = backend.control_tokens
                tokens = []
                for index, piece in enumerate(prompt.pieces):
                    piece_tokens = [controls[piece.text]] if piece.control else backend.tokenize(piece.text, special=False)
                    if count_shared and index == prompt.shared_pieces:
                        site_part = backend.tokenize(piece.text[:prompt.shared_chars], special=False) \
                            if prompt.shared_chars else []
                        shared = len(tokens) + common_prefix_length(site_part, piece_tokens)
                    tokens += piece_tokens
                if prompt.shared_pieces >= len(prompt.pieces):
                    shared = len(tokens)
            else:
                tokens = backend.tokenize(prompt, special=True)
        bos = self._backend.bos_token_id
        if self._backend.add_bos and bos is not None and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
            shared += 1 if shared else 0
        return tokens, shared

    def submit(self, prompt: str, params: SamplingParams, *, owner: str = "") -> Generation:
        """Queue a request; returns at once. Raises ContextOverflow, UnsupportedFeature, InvalidRequest,
        EngineOverloaded, EngineClosed."""
        with self._use() as backend:
            backend.check_params(params)
        tokens, shared = self._tokens_and_shared(prompt)
        if not tokens:  # nothing to decode: there would be no logits of its own to sample from
            raise InvalidRequest("The prompt is empty: it must contain at least one token.")
        if len(tokens) + 1 > self.context_length:
            raise ContextOverflow(len(tokens), self.context_length)
        # A stream waits (wait_admitted) for its slot before its response starts: up to queue_timeout, after
        # which the scheduler fails it with EngineOverloaded, or MAX_ADMISSION_WAIT without a queue_timeout.
        admission_wait = self.spec.queue_timeout + 1.0 if self.spec.queue_timeout else MAX_ADMISSION_WAIT
        with self._use() as backend:  # a file read, here rather than in the scheduler's decode loop
            saved_state = backend.saved_state_for(tokens, owner=owner, shared=shared)
        generation = Generation(uuid.uuid4().hex, on_cancel=self._scheduler.wake, queued=True,
                                admission_wait=admission_wait)
        seq = Sequence(
            generation=generation,
            prompt_tokens=tokens,
            params=params,
            max_new_tokens=min(params.max_tokens, self.context_length - len(tokens)),
            assembler=TextAssembler(params.stop),
            logprob_track=LogprobTrack() if params.logprobs is not None else None,
            owner=owner,
            shared_tokens=shared,
            saved_state=saved_state,
        )
        self._scheduler.submit(seq)
        return generation

    def admission_held(self):
        return self._scheduler.admission_held()

    def stats(self) -> dict:
        """Counters: active, queued, prefix_hits, prefix_misses, tokens_generated, prompt_tokens (since load),
        plus cached_prompt_tokens, peak_active, preemptions/resumptions (sequences suspended for another owner and
        resumed; `suspended`: waiting to resume) and backend details (prefix cache size)."""
        return self._scheduler.stats()

    def close(self) -> None:
        """Stop the scheduler (pending requests fail with EngineClosed) and free the model after its last user."""
        with self._lifetime:
            if self._closed:
                return
            self._closed = True
            while self._uses:  # each use is one short call (tokenize...): never a generation
                self._lifetime.wait()
        self._scheduler.close(on_stopped=self._backend.close)
