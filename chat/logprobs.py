"""Logprobs in the OpenAI API: what a request asks for, and the engine's token records in the response shapes."""

from __future__ import annotations

from .errors import ApiError

LOGPROBS_BACKEND = "llama_cpp"  # the only backend that exposes its logits


def requested_logprobs(*, data: dict, engine, legacy: bool = False) -> int | None:
    """How many likeliest tokens to report per reply token, None when the request wants no logprobs.

    Chat: `logprobs: true` plus `top_logprobs` (0-20). Legacy /v1/completions: `logprobs` is that number
    (0-5). Refused with a 400 naming `logprobs` where the model's backend cannot compute them.
    """
    if legacy:
        count = data.get("logprobs")
    else:
        count = (data.get("top_logprobs") or 0) if data.get("logprobs") else None
    if count is None:
        return None
    backend = engine.spec.backend
    if backend != LOGPROBS_BACKEND:
        raise ApiError(f"logprobs need the {LOGPROBS_BACKEND} backend; model {engine.spec.name!r} uses {backend}.",
                       param="logprobs", code="unsupported")
    return int(count)


def chat_logprobs(records) -> dict | None:
    """`choices[].logprobs` of a chat completion (or chunk): None when none were asked for."""
    if records is None:
        return None
    return {"content": [_entry(record, top_logprobs=[_entry(other) for other in record.top]) for record in records],
            "refusal": None}


def _entry(record, **extra) -> dict:
    return {"token": record.token, "logprob": record.logprob, "bytes": list(record.bytes), **extra}


class LegacyLogprobs:
    """`choices[].logprobs` of /v1/completions (tokens, token_logprobs, top_logprobs, text_offset); keeps the
    text offset across the chunks of a stream."""

    def __init__(self):
        self.offset = 0  # characters of the reply before the next token

    def shape(self, records) -> dict:
        body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for record in records:
            body["tokens"].append(record.token)
            body["token_logprobs"].append(record.logprob)
            # As in the OpenAI API, the sampled token is always among its step's entries.
            body["top_logprobs"].append({**{other.token: other.logprob for other in record.top},
                                         record.token: record.logprob})
            body["text_offset"].append(self.offset)
            self.offset += len(record.token)
        return body
