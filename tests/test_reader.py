"""The job's input reader: every format, every bad row named, broken specs/files as JobSpecError naming the field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.jobspec import InputSpec, JobSpecError
from pipeline.reader import read_input, stable_id

ROWS = [
    {"id": "a", "prompt": "The capital of France is", "target": " Paris", "topic": "geo"},
    {"id": "b", "prompt": "Two plus two is", "target": None, "topic": "math"},
    {"id": 7, "prompt": "Water boils at", "target": " 100", "topic": "sci"},
]


def _spec(path, **kw) -> InputSpec:
    return InputSpec(path=str(path), **kw)


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in table.to_pylist()}


def test_formats_agree(tmp_path):
    _write_jsonl(tmp_path / "p.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist([{**r, "id": str(r["id"])} for r in ROWS]), tmp_path / "p.parquet")
    lines = ["id,prompt,target,topic"] + [f"{r['id']},{r['prompt']},{r['target'] or ''},{r['topic']}" for r in ROWS]
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import datasets

    datasets.Dataset.from_list([{**r, "id": str(r["id"])} for r in ROWS]).save_to_disk(str(tmp_path / "hf"))
    tables = {
        name: read_input(_spec(tmp_path / name, metadata_columns=["topic"]))
        for name in ("p.jsonl", "p.parquet", "p.csv", "hf")
    }
    for name, table in tables.items():
        rows = _by_id(table)
        assert list(rows) == ["a", "b", "7"], name
        assert rows["a"]["prompt"] == "The capital of France is" and rows["a"]["target"] == " Paris", name
        assert rows["b"]["target"] is None, f"{name}: a missing target means 'generate'"
        assert json.loads(rows["7"]["metadata"]) == {"topic": "sci"}, name
        assert all(r["input_error"] is None for r in rows.values()), name


def test_directory_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    _write_jsonl(tmp_path / "d" / "one.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "d" / "two.jsonl", ROWS[2:])
    (tmp_path / "d" / "_ignored.jsonl").write_text("not json\n")
    assert read_input(_spec(tmp_path / "d")).num_rows == 3
    assert read_input(_spec(tmp_path / "d" / "t*.jsonl")).column("prompt_id").to_pylist() == ["7"]


def test_hash_ids_are_stable_without_an_id_column(tmp_path):
    _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello", "target": " world"}, {"prompt": "Hello"}])
    ids = read_input(_spec(tmp_path / "p.jsonl", id_column=None)).column("prompt_id").to_pylist()
    assert ids == [stable_id("Hello", " world"), stable_id("Hello", None)]
    assert ids[0] != ids[1] and len(ids[0]) == 16
    # the same rows in another file and format get the same ids
    pq.write_table(pa.table({"prompt": ["Hello", "Hello"], "target": [" world", None]}), tmp_path / "p.parquet")
    assert read_input(_spec(tmp_path / "p.parquet", id_column=None)).column("prompt_id").to_pylist() == ids


def test_bad_rows_are_named_not_dropped(tmp_path):
    lines = [
        json.dumps({"id": "ok", "prompt": "fine"}).encode(),
        json.dumps({"id": "nokey", "text": "no prompt here"}).encode(),
        json.dumps({"id": "null", "prompt": None}).encode(),
        json.dumps({"id": "int", "prompt": 42}).encode(),
        json.dumps({"id": "empty", "prompt": "   "}).encode(),
        b'{"id": "utf8", "prompt": "caf\xe9"}',
        b'{"id": "broken", "prompt": ',
        b"[1, 2]",
        json.dumps({"id": "ok", "prompt": "a duplicate id"}).encode(),
        json.dumps({"id": "span", "prompt": "abc", "span": "nope"}).encode(),
        json.dumps({"id": "tgt", "prompt": "abc", "target": 5}).encode(),
    ]
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    table = read_input(_spec(tmp_path / "p.jsonl", explain_span_column="span"))
    assert table.num_rows == len(lines), "every line is accounted for"
    errors = {r["prompt_id"]: r["input_error"] for r in table.to_pylist()}
    assert errors["ok"] is None
    assert "no 'prompt' value" in errors["nokey"]
    assert "is null" in errors["null"]
    assert "must be a string, got int" in errors["int"]
    assert "empty" in errors["empty"]
    (utf8,) = [e for k, e in errors.items() if k.endswith(":6")]
    assert "line 6: invalid UTF-8 (byte 0xe9" in utf8
    (broken,) = [e for k, e in errors.items() if k.endswith(":7")]
    assert "line 7: not valid JSON" in broken
    (array,) = [e for k, e in errors.items() if k.endswith(":8")]
    assert "JSON object is expected" in array
    (dup,) = [k for k in errors if k.startswith("ok#dup@")]
    assert "duplicate id 'ok'" in errors[dup] and "p.jsonl:1" in errors[dup]
    assert "explain_span" in errors["span"]
    assert "target" in errors["tgt"]
    assert len(set(table.column("prompt_id").to_pylist())) == table.num_rows, "ids are unique"


def test_ids_cannot_forge_the_markers_of_duplicates_and_bad_rows(tmp_path):
    """Real ids equal to the markers the reader gives a repeated id or an unreadable row: every row keeps a unique
    id and its own message (issue 13: such an id once made the run delete a whole part)."""
    path = tmp_path / "p.jsonl"
    dup, bad = f"x#dup@{path}:4", f"row@{path}:5"  # the markers the repeat and the broken line would get
    lines = [
        {"id": "x", "prompt": "first"},
        {"id": dup, "prompt": "looks like the marker of the repeat below"},
        {"id": bad, "prompt": "looks like the marker of the broken row below"},
        {"id": "x", "prompt": "a repeat"},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + "\n{broken\n"
    path.write_text(text, encoding="utf-8")
    table = read_input(_spec(path))
    ids = table.column("prompt_id").to_pylist()
    assert len(set(ids)) == len(ids) == 5
    rows = _by_id(table)
    assert rows[dup]["input_error"] is None and rows[bad]["input_error"] is None
    assert "duplicate id 'x'" in rows[f"{dup}#2"]["input_error"]
    assert "not valid JSON" in rows[f"{bad}#2"]["input_error"]


def test_csv_row_problems(tmp_path):
    (tmp_path / "p.csv").write_text('id,prompt,target\na,"fine, quoted",\nb,too,many,fields\nc,,x\n', encoding="utf-8")
    rows = _by_id(read_input(_spec(tmp_path / "p.csv")))
    assert rows["a"]["prompt"] == "fine, quoted" and rows["a"]["target"] is None
    (wide,) = [r for k, r in rows.items() if k.startswith("row@")]
    assert "4 fields, the header has 3" in wide["input_error"]
    assert "empty" in rows["c"]["input_error"]


@pytest.mark.parametrize(
    ("setup", "field"),
    [
        (lambda p: (p / "p.csv").write_text("id,text\n1,hello\n"), "input.prompt_column"),
        (lambda p: (p / "p.csv").write_bytes(b"id,prompt\n1,caf\xe9\n"), "input.path"),
        (lambda p: (p / "p.jsonl").write_text('{"text": "x"}\n'), "input.prompt_column"),
        (lambda p: pq.write_table(pa.table({"text": ["x"]}), p / "p.parquet"), "input.prompt_column"),
        (lambda p: (p / "p.txt").write_text("hello\n"), "input.format"),
        (lambda p: None, "input.path"),
    ],
)
def test_broken_files_name_the_field(tmp_path, setup, field):
    setup(tmp_path)
    files = [f for f in tmp_path.iterdir()]
    path = files[0] if files else tmp_path / "missing.jsonl"
    with pytest.raises(JobSpecError, match=f"^{field}: "):
        read_input(_spec(path))


def test_missing_metadata_column_names_the_field(tmp_path):
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(JobSpecError, match="^input.metadata_columns: .*'topic'"):
        read_input(_spec(tmp_path / "p.parquet", metadata_columns=["topic"]))


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.integers(0, 20), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
)
_rows = st.dictionaries(st.sampled_from(["id", "prompt", "target", "span", "chat", "topic"]), _values, max_size=6)
_lines = st.one_of(_rows.map(lambda r: json.dumps(r).encode()), st.binary(max_size=20).filter(lambda b: b"\n" not in b))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_lines, min_size=1, max_size=12))
def test_random_rows_are_all_accounted_for(tmp_path, lines):
    """Whatever the lines hold, the reader returns one request per non-blank line, ids unique, and a request is
    either explainable (a non-empty string prompt) or carries the reason it is not."""
    lines = [json.dumps({"prompt": "anchor"}).encode(), *lines]  # a file with no prompt key at all is a spec error
    path = tmp_path / "random.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    table = read_input(_spec(path, explain_span_column="span", chat_column="chat", metadata_columns=["topic"]))
    assert table.num_rows == sum(1 for line in lines if line.strip())
    ids = table.column("prompt_id").to_pylist()
    assert len(set(ids)) == len(ids)
    for row in table.to_pylist():
        if row["input_error"] is None:
            assert isinstance(row["prompt"], str) and row["prompt"].strip()
        else:
            assert row["input_error"].strip()
