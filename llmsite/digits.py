"""Numbers written in a client's text (ids, token ids, header values), checked before int() reads them."""


def is_decimal(text: str, *, max_digits: int) -> bool:
    """`text` is a plain decimal number (ASCII 0-9 only) of at most `max_digits` digits. str.isdigit alone also
    passes other scripts' digits and superscripts ("²"), which int() refuses, and int() refuses numbers of more
    than 4,300 digits."""
    return text.isascii() and text.isdigit() and len(text) <= max_digits
