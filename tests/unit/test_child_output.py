"""A child's output as `up` prints it: whole lines, long ones cut with a marker, never stuck."""

from __future__ import annotations

from services.cli.child import LineCutter


def test_lines_split_across_reads_come_out_whole() -> None:
    cut = LineCutter(max_bytes=100)
    assert cut.feed(b"one\ntw") == ["one"]
    assert cut.feed(b"o\r\nthr") == ["two"]
    assert cut.feed(b"ee") == []
    assert cut.flush() == ["three"]  # the last words, without a newline
    assert cut.flush() == []


def test_a_long_line_keeps_its_head_and_says_how_much_was_cut() -> None:
    cut = LineCutter(max_bytes=10)
    out = cut.feed(b"0123456789" * 3)
    out += cut.feed(b"abc" * 1000 + b"\nnext\n")
    assert out == [f"0123456789…({20 + 3000} bytes cut)", "next"]


def test_a_character_cut_in_half_does_not_break_decoding() -> None:
    cut = LineCutter(max_bytes=2)  # a, then the first of é's two bytes
    assert cut.feed("aé€\n".encode()) == ["a\ufffd…(4 bytes cut)"]
