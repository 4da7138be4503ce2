"""Client text in vocabularies whose user-defined tokens llama.cpp matches in any text.

llama.cpp matches user-defined tokens (token attribute USER_DEFINED) in everything it tokenizes, with
special-token parsing or without (llama-vocab.cpp, `tokenizer_st_partition`: only control and unknown
tokens are skipped), as Hugging Face tokenizers match non-special added tokens. A GGUF may mark chat
markup, e.g. ChatML's "<|im_start|>", user-defined: client text spelling it would become that token.
The backend therefore tokenizes text in fragments none of which holds such a token's text whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def literal_pattern(texts: Iterable[str]) -> re.Pattern | None:
    """A pattern of the texts, longest first (None when there are none); single characters cannot be split."""
    texts = sorted({text for text in texts if len(text) > 1}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def literal_fragments(text: str, pattern: re.Pattern | None) -> list[str]:
    """`text` cut so that no fragment contains a match of `pattern` whole: each match is cut in halves (cut
    again where a half holds a shorter match). Joined, the fragments are `text`."""
    if pattern is None:
        return [text] if text else []
    fragments, position = [], 0
    for match in pattern.finditer(text):
        word, half = match.group(), len(match.group()) // 2
        fragments += [text[position:match.start()], *literal_fragments(word[:half], pattern),
                      *literal_fragments(word[half:], pattern)]
        position = match.end()
    fragments.append(text[position:])
    return [fragment for fragment in fragments if fragment]
