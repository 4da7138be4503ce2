"""GBNF for the string formats the converter enforces, with the length range of each (for min/maxLength)."""

from __future__ import annotations

from .ranges import natural_range

_TWO = "[0-9]{2}"
_HOUR = '([01] [0-9] | "2" [0-3])'
_MINUTE = "[0-5] [0-9]"
_DAY_28 = '("0" [1-9] | "1" [0-9] | "2" [0-8])'
_DATE = ('[1-9] [0-9]{3} "-" (("0" [13578] | "1" [02]) "-" (' + _DAY_28 + ' | "29" | "3" [01]) | '
         '("0" [469] | "11") "-" (' + _DAY_28 + ' | "29" | "30") | "02" "-" ' + _DAY_28 + ")")
_TIME = f'{_HOUR} ":" {_MINUTE} ":" {_MINUTE} ("." [0-9]{{1,6}})? ("Z" | [+-] {_HOUR} ":" {_MINUTE})'
_HEX = "[0-9a-f]"
_OCTET = f"({natural_range(0, 255)})"
_LABEL = "[a-z0-9] ([a-z0-9-]{0,20} [a-z0-9])?"

# format -> (GBNF of the text between the quotes, shortest length, longest length)
FORMATS: dict[str, tuple[str, int, int]] = {
    "date": (_DATE, 10, 10),
    "time": (_TIME, 9, 21),
    "date-time": (f'{_DATE} "T" {_TIME}', 20, 32),
    "uuid": (f'{_HEX}{{8}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{12}}', 36, 36),
    "email": ('[a-z0-9] [a-z0-9._+-]{0,30} "@" [a-z0-9] [a-z0-9-]{0,20} ("." [a-z]{2,6}){1,2}', 6, 67),
    "ipv4": (f'{_OCTET} "." {_OCTET} "." {_OCTET} "." {_OCTET}', 7, 15),
    "hostname": (f'{_LABEL} ("." {_LABEL}){{0,3}}', 1, 95),
    "uri": ('"http" "s"? "://" ' + _LABEL + ' ("." ' + _LABEL + ') ("/" [a-zA-Z0-9._~%-]{0,20}){0,4}', 10, 146),
}
FORMATS["ipv6"] = (f'{_HEX}{{1,4}} (":" {_HEX}{{1,4}}){{7}}', 15, 39)
FORMATS["regex"] = ("[a-zA-Z0-9 ]{0,20}", 0, 20)  # letters, digits and spaces: always a valid expression
FORMATS["duration"] = ('"P" [1-9] [0-9]{0,2} [YMWD] | "PT" [1-9] [0-9]{0,2} [HMS]', 3, 6)
FORMATS["json-pointer"] = ('("/" ([a-zA-Z0-9_] | "~" [01]){0,10}){0,5}', 0, 105)
FORMATS["relative-json-pointer"] = ('[0-9] ("#" | ("/" ([a-zA-Z0-9_] | "~" [01]){0,10}){0,5})', 1, 106)
FORMATS["idn-email"] = FORMATS["email"]
FORMATS["idn-hostname"] = FORMATS["hostname"]
FORMATS["iri"] = FORMATS["uri"]
FORMATS["uri-reference"] = FORMATS["uri"]
FORMATS["iri-reference"] = FORMATS["uri"]
FORMATS["uri-template"] = FORMATS["uri"]  # a URI without braces is a template too

# Formats that validators check but this server cannot write: refused rather than left unenforced.
REFUSED: frozenset[str] = frozenset()
