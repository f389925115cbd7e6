"""The grammar-engine benchmark's pure parts: a measuring process's row, the table's line, and
the byte-level BPE table outlines-core's vocabulary is built with."""

from __future__ import annotations

from bench.grammar_peers import HEADER, Row, byte_level, byte_table, format_row, parse_row

ROW = Row(
    engine="xgrammar",
    tokenizer="stdlib BPE 32k",
    vocab=32000,
    tokens=60,
    size_mb=14.35,
    convert_ms=812.4,
    compile_ms=95.25,
    cold_us=12.4,
    median_us=8.6,
    p99_us=40.2,
    apply_us=30.1,
    advance_us=2.44,
)


def test_parse_row_reads_the_last_line_and_ignores_what_a_library_printed_before() -> None:
    import msgspec

    stdout = "some library's warning\n" + msgspec.json.encode(ROW).decode() + "\n\n"
    assert parse_row(stdout, "xgrammar", "stdlib BPE 32k") == ROW


def test_parse_row_names_a_missing_or_broken_row() -> None:
    assert parse_row("", "lm-format-enforcer", "demo").error == "no output"
    broken = parse_row('{"engine": "x"', "outlines-core", "demo")
    assert (broken.engine, broken.tokenizer) == ("outlines-core", "demo")
    assert broken.error.startswith("bad row:")


def test_format_row_lines_up_under_the_header() -> None:
    line = format_row(ROW)
    assert len(line) == len(HEADER)
    assert line.split() == [
        "xgrammar", "stdlib", "BPE", "32k", "32000", "60", "14.3", "812", "95.2", "12", "9",
        "40", "30", "2.4",
    ]  # fmt: skip


def test_format_row_says_when_advance_is_inside_the_mask_and_shows_an_error() -> None:
    lmfe = Row(**{**{f: getattr(ROW, f) for f in ROW.__struct_fields__}, "advance_us": None})
    assert format_row(lmfe).endswith("in mask")
    failed = Row(engine="outlines-core", tokenizer="demo", error="over 300 s (stopped)")
    assert format_row(failed).split()[2:] == ["over", "300", "s", "(stopped)"]


def test_byte_level_tokens_become_their_bytes() -> None:
    table = byte_table()
    assert len(table) == 256
    assert sorted(table.values()) == list(range(256))
    assert byte_level("Ġworld", table) == b" world"  # Ġ: the space
    assert byte_level("Ċ", table) == b"\n"
    assert byte_level("Ã©", table) == "é".encode()  # two bytes of one character
    assert byte_level("<|end|>", table) == b"<|end|>"  # printable ASCII is itself
    assert byte_level("</s>😀", table) == "</s>😀".encode()  # not byte-level: its UTF-8
