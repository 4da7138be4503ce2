"""A JSON parser that bounds the body size and explains bad bodies without internal messages."""

import json

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from chat.errors import PayloadTooLarge


def _refuse_constant(name):
    raise ValueError(name)


class StrictJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.API_MAX_REQUEST_BYTES
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise ParseError(f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}.") from None
        except ValueError as exc:
            raise ParseError(f"The request body holds {exc.args[0]}, which JSON does not allow.") from None
        except RecursionError:
            raise ParseError("The request body is nested too deeply.") from None
        try:
            # "\ud800"-style escapes decode to lone surrogates, which no tokenizer can encode.
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ParseError("The request body holds an invalid Unicode escape (a lone surrogate).") from None
        return data
