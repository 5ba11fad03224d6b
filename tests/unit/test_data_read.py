"""Readers: every supported input form, the start line of each record, and file-level errors."""

import json

import pytest

from dsft.data.read import RawRecord, read_records
from dsft.errors import DsftError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_skips_blank_lines_and_names_start_lines(tmp_path):
    path = _write(tmp_path / "train.jsonl", '{"text": "a"}\n\n  \n{"text": "b"}\n')
    assert list(read_records(path)) == [
        RawRecord({"text": "a"}, f"{path}:1"),
        RawRecord({"text": "b"}, f"{path}:4"),
    ]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "train.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(DsftError, match=r"train\.jsonl:3: not valid JSON: Expecting value"):
        list(read_records(path))


def test_jsonl_record_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "train.jsonl", '["a", "b"]\n')
    with pytest.raises(DsftError, match=r"train\.jsonl:1: expected a JSON object, got list$"):
        list(read_records(path))


def test_jsonl_bad_records_go_to_the_callback_and_reading_goes_on(tmp_path):
    path = _write(tmp_path / "train.jsonl", '{"text": "a"}\nnot json\n7\n{"text": "d"}\n')
    errors = []
    records = list(read_records(path, on_bad_record=errors.append))
    assert [record.source for record in records] == [f"{path}:1", f"{path}:4"]
    assert [str(error) for error in errors] == [
        f"{path}:2: not valid JSON: Expecting value (column 1)",
        f"{path}:3: expected a JSON object, got number",
    ]


def test_json_array_names_the_line_where_each_record_starts(tmp_path):
    text = '[\n  {"text": "a"},\n  {\n    "text": "b"\n  }, {"text": "c"}\n]\n'
    path = _write(tmp_path / "train.json", text)
    records = list(read_records(path))
    assert [(record.data["text"], record.source) for record in records] == [
        ("a", f"{path}:2"),
        ("b", f"{path}:3"),
        ("c", f"{path}:5"),
    ]


def test_json_empty_array_has_no_records(tmp_path):
    assert list(read_records(_write(tmp_path / "train.json", " [ ] "))) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"text": "a"}', r"top-level array of records, got object"),
        ('[\n{"text": "a"},\n{"text": }\n]', r"train\.json:3: not valid JSON: Expecting value"),
        ('[\n{"text": "a"}\n{"text": "b"}]', r"train\.json:3: not valid JSON: Expecting ',' delimiter"),
        ('[{"text": "a"},\n]', r"train\.json:2: not valid JSON: Expecting value"),
        ('[{"text": "a"}]\n[]', r"train\.json:2: not valid JSON: Extra data"),
        ("", r"train\.json:1: not valid JSON: Expecting value"),
    ],
)
def test_json_file_errors(tmp_path, text, message):
    with pytest.raises(DsftError, match=message):
        list(read_records(_write(tmp_path / "train.json", text)))


def test_json_element_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "train.json", '[\n{"text": "a"},\n"b"\n]')
    with pytest.raises(DsftError, match=r"train\.json:3: expected a JSON object, got string$"):
        list(read_records(path))


def test_csv_rows_with_start_lines_across_quoted_newlines_and_blank_lines(tmp_path):
    text = 'instruction,output\nsay hi,hi\n"two\nlines",ok\n\nlast,one\n'
    path = _write(tmp_path / "train.csv", text)
    assert list(read_records(path)) == [
        RawRecord({"instruction": "say hi", "output": "hi"}, f"{path}:2"),
        RawRecord({"instruction": "two\nlines", "output": "ok"}, f"{path}:3"),
        RawRecord({"instruction": "last", "output": "one"}, f"{path}:6"),
    ]


def test_csv_row_with_wrong_cell_count(tmp_path):
    path = _write(tmp_path / "train.csv", "instruction,output\na,b,c\n")
    with pytest.raises(DsftError, match=r"train\.csv:2: expected 2 cells \(instruction, output\), got 3"):
        list(read_records(path))


def test_csv_duplicate_header(tmp_path):
    path = _write(tmp_path / "train.csv", "text,text\na,b\n")
    with pytest.raises(DsftError, match=r"train\.csv:1: duplicate column names in the csv header: text"):
        list(read_records(path))


def test_parquet_rows(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "train.parquet"
    table = pyarrow.table({"instruction": ["a", "b"], "output": ["x", "y"]})
    pyarrow.parquet.write_table(table, path)
    assert list(read_records(path)) == [
        RawRecord({"instruction": "a", "output": "x"}, f"{path}:row 1"),
        RawRecord({"instruction": "b", "output": "y"}, f"{path}:row 2"),
    ]


def test_parquet_corrupt_file(tmp_path):
    path = _write(tmp_path / "train.parquet", "not parquet")
    with pytest.raises(DsftError, match=r"train\.parquet: not a readable parquet file"):
        list(read_records(path))


def test_datasets_directory_and_single_split_dict(tmp_path):
    import datasets

    rows = [{"text": "a"}, {"text": "b"}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "plain")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dict")
    for name in ("plain", "dict"):
        path = tmp_path / name
        assert list(read_records(path)) == [
            RawRecord({"text": "a"}, f"{path}:row 1"),
            RawRecord({"text": "b"}, f"{path}:row 2"),
        ]


def test_datasets_dict_with_several_splits_names_them(tmp_path):
    import datasets

    split = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "ds")
    with pytest.raises(DsftError, match=r"a DatasetDict with splits train, test; name one split's directory"):
        list(read_records(tmp_path / "ds"))


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DsftError, match=r"not a dataset saved with datasets' save_to_disk"):
        list(read_records(tmp_path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DsftError, match=r"data file not found: .*nope\.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    allowed = r"allowed: \.jsonl, \.json, \.csv, \.parquet, or a directory saved with datasets' save_to_disk"
    with pytest.raises(DsftError, match=rf"unsupported data file extension '\.txt'; {allowed}"):
        read_records(_write(tmp_path / "train.txt", "hello"))


def test_not_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DsftError, match=r"train\.jsonl: not UTF-8 text"):
        list(read_records(path))


def test_byte_order_mark_is_ignored_and_files_are_left_unchanged(tmp_path):
    path = tmp_path / "train.jsonl"
    content = "\ufeff".encode() + json.dumps({"text": "中文"}, ensure_ascii=False).encode() + b"\n"
    path.write_bytes(content)
    assert list(read_records(path)) == [RawRecord({"text": "中文"}, f"{path}:1")]
    assert path.read_bytes() == content
