"""UTF-8 reassembly and stop-string hold-back of streamed text (chat/engine/text.py)."""

from chat.engine.text import StopStringFilter, TextAssembler, Utf8Stream


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> list[str]:
    deltas = [assembler.feed(piece) for piece in pieces]
    deltas.append(assembler.finish())
    return deltas


def test_multibyte_characters_split_across_pieces_are_never_split_in_deltas():
    text = "Grüße 日本語 😀!"
    pieces = [bytes([byte]) for byte in text.encode()]  # worst case: one byte per token
    deltas = feed_all(TextAssembler(), pieces)
    assert "".join(deltas) == text
    for delta in deltas:
        delta.encode("utf-8")  # no lone surrogates, no partial characters
    assert "😀" in deltas  # the four bytes came out as one character


def test_bytes_that_can_never_be_utf8_become_replacement_characters():
    assembler = TextAssembler()
    deltas = feed_all(assembler, [b"ok \xff", b"\xe6\x97", b" end"])  # invalid byte; truncated character
    assert "".join(deltas) == "ok \ufffd\ufffd end"


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    stream = Utf8Stream()
    assert stream.feed(b"a\xf0\x9f") == "a"
    assert stream.flush() == "\ufffd"


def test_stop_string_is_held_back_across_pieces_and_not_returned():
    assembler = TextAssembler(stop=("END",))
    deltas = [assembler.feed(p) for p in [b"Hello E", b"N", b"D and more"]]
    assert deltas == ["Hello ", "", ""]
    assert assembler.stopped
    assert assembler.finish() == ""
    assert assembler.text == "Hello "


def test_held_back_text_is_released_when_it_is_not_a_stop_string():
    assembler = TextAssembler(stop=("END",))
    assert assembler.feed(b"Hello EN") == "Hello "
    assert assembler.feed(b"x") == "ENx"
    assert assembler.feed(b" E") == " "
    assert assembler.finish() == "E"  # generation ended without the rest of the stop string
    assert assembler.text == "Hello ENx E"
    assert not assembler.stopped


def test_earliest_of_several_stop_strings_wins():
    stops = StopStringFilter(["\n\n", "User:"])
    assert stops.feed("Sure. User: hi\n\nmore") == "Sure. "
    assert stops.stopped


def test_stop_string_inside_a_multibyte_sequence_boundary():
    assembler = TextAssembler(stop=("日本",))
    encoded = "abc日本".encode()
    deltas = [assembler.feed(encoded[i : i + 1]) for i in range(len(encoded))]
    assert "".join(deltas) == "abc"
    assert assembler.stopped


def test_stop_strings_cut_and_hold_back_as_a_brute_force_reading_does():
    """Fed in random pieces, the filter emits the text up to where a stop string is first complete (the earliest
    start among those completed by that character) and, until then, holds back exactly the longest tail that
    begins a stop string."""
    import random

    rng = random.Random(7)

    def held_back(stops, text):
        return max([length for stop in stops for length in range(1, min(len(stop) - 1, len(text)) + 1)
                    if text.endswith(stop[:length])], default=0)

    def cut_of(stops, text):
        for end in range(1, len(text) + 1):
            starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
            if starts:
                return min(starts)
        return None

    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 16)))
        expected_cut = cut_of(stops, text)
        stop_filter, emitted, fed = StopStringFilter(stops), "", 0
        while fed < len(text):
            piece = text[fed:fed + rng.randint(1, 4)]
            fed += len(piece)
            emitted += stop_filter.feed(piece)
            if stop_filter.stopped:
                break
            assert emitted == text[:fed - held_back(stops, text[:fed])], (stops, text, fed)
        if expected_cut is None:
            assert not stop_filter.stopped and emitted + stop_filter.flush() == text, (stops, text)
        else:
            assert stop_filter.stopped and emitted == text[:expected_cut], (stops, text)

