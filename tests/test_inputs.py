"""Input formats (ettin.data.inputs): one table, found by suffix, named in the help, read by kind."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ettin.data.inputs import (
    INPUT_FORMATS,
    PLAIN_TEXT_KIND,
    BadRecord,
    Document,
    InputError,
    find_inputs,
    input_suffixes,
    iter_records,
)

# ---------------------------------------------------------------------------------------------
# The format table


def test_every_format_is_found_by_its_suffixes_and_named_in_the_help(tmp_path):
    kinds = [fmt.kind for fmt in INPUT_FORMATS]
    assert len(set(kinds)) == len(kinds) and PLAIN_TEXT_KIND in kinds
    suffixes = [s for fmt in INPUT_FORMATS for s in fmt.suffixes]
    assert len(set(suffixes)) == len(suffixes)
    assert input_suffixes() == ".jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt"
    for fmt in INPUT_FORMATS:
        for suffix in fmt.suffixes:
            (tmp_path / f"x{suffix}").touch()
    (tmp_path / "x.csv").touch()
    found = {Path(s.path).name: s.kind for s in find_inputs([tmp_path])}
    assert found == {f"x{s}": fmt.kind for fmt in INPUT_FORMATS for s in fmt.suffixes}

    import argparse

    from ettin.data.commands import add_prepare_parser, add_train_tokenizer_parser

    for add_parser in (add_prepare_parser, add_train_tokenizer_parser):
        help_text = " ".join(add_parser(argparse.ArgumentParser().add_subparsers()).format_help().split())
        assert f"{input_suffixes()} files, or directories holding them" in help_text


def test_an_unknown_suffix_names_every_format(tmp_path):
    (tmp_path / "x.csv").touch()
    with pytest.raises(InputError, match=f"expected {input_suffixes()} \\(or pass it with"):
        find_inputs([tmp_path / "x.csv"])
    with pytest.raises(InputError, match=f"expected {input_suffixes()} files"):
        find_inputs([tmp_path])


def test_records_of_each_reader(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "one", "id": "x"}) + "\n\n{oops\n" + json.dumps([1]) + "\n")
    (tmp_path / "b.txt").write_text("two")
    (tmp_path / "c.jsonl").write_text('{"text": "   "}\n')
    a, b, c = find_inputs([tmp_path])
    assert list(iter_records(a)) == [
        Document(1, "x", "one", 3),
        BadRecord("invalid_json", 3, "Expecting property name enclosed in double quotes at column 2"),
        BadRecord("missing_text", 4, "the line is a JSON list, not an object"),
    ]
    assert list(iter_records(b)) == [Document(1, b.name, "two", 3)]
    assert list(iter_records(c)) == [BadRecord("empty_text", 1, "'text' is empty or whitespace")]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n')[:-6])
    with pytest.raises(InputError, match="cannot read input .*a.jsonl.gz"):
        list(iter_records(find_inputs([tmp_path / "a.jsonl.gz"])[0]))
