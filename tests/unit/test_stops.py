"""StopScanner: stops inside a piece, across pieces, partial matches released at the end."""

from __future__ import annotations

import pytest

from services.worker.engines.stops import StopScanner


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "stopped"),
    [
        ((), ["a", "b"], ["a", "b"], False),
        (("END",), ["hello ", "wor", "ld"], ["hello ", "wor", "ld"], False),
        (("END",), ["one END two"], ["one "], True),
        (("END",), ["one E", "N", "D two"], ["one ", "", ""], True),  # split across pieces
        (("END",), ["one E", "x"], ["one ", "Ex"], False),  # a false alarm is released
        (("\n\n", "###"), ["a\n", "\nb"], ["a", ""], True),
        (("ab", "b"), ["xa", "b"], ["x", ""], True),  # the earliest stop wins
        (("END",), ["END", "more"], ["", ""], True),
    ],
)
def test_feed(stops: tuple[str, ...], pieces: list[str], emitted: list[str], stopped: bool) -> None:
    scanner = StopScanner(stops)
    assert [scanner.feed(p) for p in pieces] == emitted
    assert scanner.stopped is stopped


def test_flush_releases_held_back_text() -> None:
    scanner = StopScanner(("END",))
    assert scanner.feed("the E") == "the "
    assert scanner.flush() == "E"
    assert scanner.flush() == ""


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted"),
    [
        (("END",), ["one END two"], ["one END"]),
        (("END",), ["one E", "N", "D two"], ["one ", "", "END"]),  # split across pieces
        (("ab", "b"), ["xa", "b c"], ["x", "ab"]),  # the earliest stop, kept whole
        (("abc", "ab"), ["xabcd"], ["xabc"]),  # two start there: the first the request lists
    ],
)
def test_include_keeps_the_stop_string(
    stops: tuple[str, ...], pieces: list[str], emitted: list[str]
) -> None:
    """vLLM's include_stop_str_in_output: the text ends after the stop string, not before."""
    scanner = StopScanner(stops, include=True)
    assert [scanner.feed(p) for p in pieces] == emitted
    assert scanner.stopped
    assert scanner.flush() == ""
