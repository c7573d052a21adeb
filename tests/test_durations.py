"""The order `make test` runs files in (tests/durations.py): longest measured first, a new file as the median."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from durations import file_seconds, longest_first


def _items(*names: str) -> list:
    return [SimpleNamespace(path=Path("tests") / n.split("::")[0], name=n) for n in names]


def test_files_go_longest_first_and_tests_keep_their_order(tmp_path):
    table = tmp_path / "durations.json"
    table.write_text(json.dumps({"test_a.py": 1.0, "test_b.py": 300.0, "test_c.py": 20.0, "test_d.py": 5.0}))
    items = _items("test_a.py::x", "test_new.py::n1", "test_b.py::y1", "test_a.py::z", "test_b.py::y2",
                   "test_new.py::n2", "test_c.py::c", "test_d.py::d")  # fmt: skip
    longest_first(items, table)
    assert [i.name for i in items] == [
        "test_b.py::y1", "test_b.py::y2", "test_c.py::c",
        "test_new.py::n1", "test_new.py::n2",  # not measured: the median (12.5 s)
        "test_d.py::d", "test_a.py::x", "test_a.py::z",
    ]  # fmt: skip


def test_without_a_table_the_order_is_unchanged(tmp_path):
    items = _items("test_a.py::x", "test_b.py::y", "test_a.py::z")
    longest_first(items, tmp_path / "none.json")
    assert [i.name for i in items] == ["test_a.py::x", "test_a.py::z", "test_b.py::y"], "grouped by file, in order"


def test_seconds_per_file_from_junit(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="x" time="1.5"/>'
        '<testcase classname="tests.test_b.TestK" name="y" time="7"/><testcase classname="tests.test_a" name="z" '
        'time="2.25"/><testcase classname="other" name="w" time="9"/></testsuite></testsuites>'
    )
    assert list(file_seconds(xml).items()) == [("test_b.py", 7.0), ("test_a.py", 3.8)]
