"""A JSON parser that bounds the body size and explains bad bodies without internal messages."""

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from chat.errors import PayloadTooLarge
from llmsite.strict_json import StrictJSONError, strict_json_loads


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
            return strict_json_loads(text)
        except StrictJSONError as exc:
            raise ParseError(f"The request body is not valid JSON: {exc}.") from None
