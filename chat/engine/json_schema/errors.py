"""The one error of the JSON Schema converter: a schema it refuses, naming the keyword and where it is."""

from __future__ import annotations

from ..errors import InvalidRequest


class SchemaNotConvertible(InvalidRequest):
    """The schema asks for something no reply can satisfy, or something the server cannot enforce.

    `keyword` is the JSON Schema keyword at fault and `path` its JSON pointer in the schema; `code` is
    "unsatisfiable_schema" or "unsupported_schema". The message says both, in schema terms only.
    """

    def __init__(self, detail: str, *, keyword: str | None, path: str, unsatisfiable: bool = False):
        self.keyword = keyword
        self.path = path or "/"
        self.code = "unsatisfiable_schema" if unsatisfiable else "unsupported_schema"
        self.detail = detail
        where = f"keyword '{keyword}' at {self.path}" if keyword else "in the schema"
        kind = "can never be satisfied" if unsatisfiable else "cannot be enforced by this server"
        super().__init__(f"{detail} ({where}: {kind}).")
