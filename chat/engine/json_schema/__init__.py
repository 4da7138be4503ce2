"""JSON Schema to GBNF: every keyword it accepts is enforced by the grammar; the rest is refused by name."""

from .converter import Converter, one_regex_budget
from .errors import SchemaNotConvertible


def schema_grammar(schema, *, root: str = "root") -> str:
    """GBNF whose rule `root` matches compact JSON texts valid under `schema` (SchemaNotConvertible if none)."""
    try:
        return Converter(schema).grammar(root)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        # A keyword whose value has a type or size no rule expected ({"required": 5}, "format": ["date"], a
        # minimum of 10**400): the client's mistake, answered as such rather than as a server error.
        if isinstance(exc, SchemaNotConvertible):  # (an InvalidRequest is a ValueError)
            raise
        raise SchemaNotConvertible("A keyword has a value of the wrong type or size", keyword=None,
                                   path="/") from None
    except RecursionError:  # e.g. a pattern of a thousand nested groups, compiled to be checked against a value
        raise SchemaNotConvertible("The schema or one of its patterns nests too deeply", keyword=None,
                                   path="/") from None


__all__ = ["SchemaNotConvertible", "one_regex_budget", "schema_grammar"]
