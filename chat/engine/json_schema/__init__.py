"""JSON Schema to GBNF: every keyword it accepts is enforced by the grammar; the rest is refused by name."""

from .converter import Converter
from .errors import SchemaNotConvertible


def schema_grammar(schema, *, root: str = "root") -> str:
    """GBNF whose rule `root` matches compact JSON texts valid under `schema` (SchemaNotConvertible if none)."""
    return Converter(schema).grammar(root)


__all__ = ["SchemaNotConvertible", "schema_grammar"]
