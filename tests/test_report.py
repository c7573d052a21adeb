"""`atman report`: one self-contained HTML page, checked in headless Chromium."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from browser import browser, console_errors, keep  # noqa: F401 - fixture
from test_query import PROMPTS, make_run

ATMAN = str(Path(sys.executable).parent / "atman")


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir) -> str:
    root = str(tmp_path_factory.mktemp("report") / "out")
    make_run(tiny_model_dir, root, "small")
    many = [{"id": f"m{i:02d}", "prompt": f"Item {i} of the list is the word", "target": " blue"} for i in range(30)]
    make_run(tiny_model_dir, root, "many", many + [{"id": "broken", "prompt": 7}])
    return root


def _report(root: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`atman report` in a narrow terminal (COLUMNS=40): the path it prints must still be one line."""
    env = {**os.environ, "COLUMNS": "40"}
    cmd = [ATMAN, "report", root, "--out", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return res


def test_report_loads_without_errors_and_shows_every_prompt(root, browser, tmp_path):  # noqa: F811
    page = tmp_path / "report.html"
    _report(root, page, "--run-id", "small")
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?https?:|@import""", text), (
        "the page fetches nothing from the network"
    )
    dom, log = browser.load(page, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and 'data-errors="0"' in body, body
    assert f'data-prompts="{len(PROMPTS)}"' in body
    assert console_errors(log) == []
    for p in PROMPTS:
        assert f'data-id="{p["id"]}"' in dom
    assert 'title="score ' in dom, "each unit carries its score on hover"
    assert "Errors and skipped rows (1)" in dom and "prompt: empty" in dom
    png = browser.screenshot(page, tmp_path / "report.png", tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    keep(png)  # ATMAN_TEST_ARTIFACTS: for a person to look at after the run


def test_large_runs_paginate_and_cap(root, browser, tmp_path):  # noqa: F811
    page = tmp_path / "many.html"
    _report(root, page, "--run-id", "many")
    dom, log = browser.load(page, tmp_path)
    assert 'data-prompts="31"' in dom and console_errors(log) == []
    assert "page 1 of 2" in dom, "25 prompts per page"
    assert dom.count('class="prompt" data-id=') - dom.count('style="display: none;"') == 25


def test_max_prompts_caps_the_page(root, tmp_path):
    """No browser needed: the cap is in the HTML the command writes."""
    section = r"<section class='prompt' data-id='([^']*)'"
    whole = tmp_path / "whole.html"
    _report(root, whole, "--run-id", "many")
    every = re.findall(section, whole.read_text())
    assert len(every) == len(set(every)) == 31 and "Showing the first" not in whole.read_text()
    capped = tmp_path / "capped.html"
    res = _report(root, capped, "--run-id", "many", "--max-prompts", "10")
    assert res.stdout.strip() == f"wrote {capped}: 10 prompts"
    text = capped.read_text()
    assert "Showing the first 10 of 31 prompts" in text
    assert re.findall(section, text) == sorted(every)[:10], "the first 10 by prompt id, nothing else"


def test_report_of_a_missing_run_exits_2(root, tmp_path):
    res = subprocess.run([ATMAN, "report", root, "--run-id", "nope", "--out", str(tmp_path / "x.html")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "run_id: no run 'nope'" in res.stderr


def test_the_browser_check_catches_a_broken_page(browser, tmp_path):  # noqa: F811
    """The checks above can fail: the same page shell with a console.error and an uncaught exception."""
    from pipeline.report import page

    broken = tmp_path / "broken.html"
    broken.write_text(page("broken", "<script>console.error('boom'); notDefined();</script><section class='prompt'>"))
    dom, log = browser.load(broken, tmp_path)
    assert 'data-errors="2"' in dom
    assert any("notDefined" in line for line in console_errors(log))
