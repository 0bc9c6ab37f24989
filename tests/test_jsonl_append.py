"""Append-only JSONL after a kill mid-line: the torn tail is cut, never glued to the next record."""

import json

from keye.jsonl import drop_torn_tail, open_append


def test_torn_tail_is_cut_and_clean_files_are_untouched(tmp_path):
    path = tmp_path / "log.jsonl"
    assert drop_torn_tail(path) == 0  # absent
    path.write_text('{"a": 1}\n{"b": 2}\n')
    assert drop_torn_tail(path) == 0 and path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert drop_torn_tail(path) == len('{"c": ')
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text("x" * 200_000)  # one torn line longer than the read-back block, nothing before it
    assert drop_torn_tail(path) == 200_000 and path.read_bytes() == b""


def test_appending_after_a_torn_line_loses_no_complete_record(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "te')  # killed while writing record 3
    with open_append(path) as fh:
        fh.write(json.dumps({"id": 3}) + "\n")
        fh.write('{"id": 4, "pa')  # killed again mid-line
    with open_append(path) as fh:
        fh.write(json.dumps({"id": 4}) + "\n")
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
