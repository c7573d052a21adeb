"""Jobs with images (issue 16): an image column (relative and absolute paths, inline Parquet bytes, null for a text
row) explained by a vision-language model on a local Ray, bad images as skipped rows naming the problem, schema v2's
image columns, the image_units view."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from bad_images import png_header, thin_png
from browser import browser  # noqa: F401 - fixture
from PIL import Image
from seaweed import s3_bucket, s3_server  # noqa: F401 - fixtures
from tiny_vlms import save_tiny_llava

from pipeline import AtManConfig, Explainer, load_model
from pipeline.job import run_job
from pipeline.jobspec import JobSpec
from pipeline.parts import SCHEMA_VERSION
from pipeline.query import connect

PROMPT = "What is shown in the picture?"


def picture(colour) -> Image.Image:
    pixels = np.full((48, 64, 3), 128, dtype=np.uint8)
    pixels[:24, :32] = colour
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tokenizer, ray_cluster):
    tmp = tmp_path_factory.mktemp("image-job")
    model_dir = save_tiny_llava(tmp / "model", tokenizer)
    data = tmp / "in"
    data.mkdir()
    picture((255, 0, 0)).save(data / "red.png")
    picture((0, 0, 255)).save(tmp / "blue.png")
    (data / "bad.png").write_text("not an image")
    (data / "bomb.png").write_bytes(png_header(60_000, 60_000))
    (data / "thin.png").write_bytes(thin_png())
    rows = [
        {"id": "rel", "prompt": PROMPT, "target": " red", "image": "red.png"},
        {"id": "abs", "prompt": PROMPT, "target": " blue", "image": str(tmp / "blue.png")},
        {"id": "text", "prompt": "The capital of France is", "target": " Paris", "image": None},
        {"id": "gen", "prompt": PROMPT, "image": "red.png"},
        {"id": "missing", "prompt": PROMPT, "target": " red", "image": "nope.png"},
        {"id": "notimage", "prompt": PROMPT, "target": " red", "image": "bad.png"},
        {"id": "number", "prompt": PROMPT, "target": " red", "image": 42},
        {"id": "bomb", "prompt": PROMPT, "target": " red", "image": "bomb.png"},
        {"id": "thin", "prompt": PROMPT, "target": " red", "image": "thin.png"},
    ]
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = io.BytesIO()
    picture((0, 255, 0)).save(png, format="PNG")
    table = pa.table({"id": ["bytes", "junk"], "prompt": [PROMPT, PROMPT], "target": [" green", " green"],
                      "image": pa.array([png.getvalue(), b"\x89PNG broken"], pa.binary())})  # fmt: skip
    pq.write_table(table, data / "b.parquet")
    spec = JobSpec.model_validate(
        {
            "name": "images",
            "model": {"id": str(model_dir)},
            "input": {"path": str(data), "image_column": "image"},
            "method": {"image_grid": "2x2", "generate_max_tokens": 2},
            "output": {"root": str(tmp / "out")},
            "resources": {"actors": 1, "batch_rows": 3},
        }
    )
    summary = run_job(spec, "r1")
    rows = {r["prompt_id"]: r for r in ds.dataset(summary.location, format="parquet").to_table().to_pylist()}
    return spec, summary, rows, model_dir, data, tmp


def test_rows_and_statuses(image_run):
    _, summary, rows, _, data, tmp = image_run
    assert set(rows) == {"rel", "abs", "text", "gen", "missing", "notimage", "number", "bytes", "junk", "bomb", "thin"}
    status = {k: (r["status"], r["error"]) for k, r in rows.items()}
    for ok in ("rel", "abs", "text", "gen", "bytes"):
        assert status[ok] == ("ok", None), (ok, status[ok])
    assert status["missing"][0] == "skipped" and f"image: {data}/nope.png does not exist" in status["missing"][1]
    assert (
        status["notimage"][0] == "skipped" and f"image: {data}/bad.png: not a readable image" in status["notimage"][1]
    )
    assert status["number"] == ("skipped", "image: must be a path, an s3:// URI or bytes, got int 42")
    assert status["junk"] == ("skipped", "image: the inline image: not a readable image (no image format Pillow knows)")
    assert status["bomb"] == ("skipped", f"image: {data}/bomb.png: 3,600,000,000 pixels is over 50,000,000 pixels")
    assert status["thin"][0] == "skipped" and status["thin"][1].startswith(
        f"image: {data}/thin.png: 1x100000: the model's processor would make it 32x3200000, over"
    )
    assert rows["rel"]["image"] == f"{data}/red.png" and rows["abs"]["image"] == str(tmp / "blue.png")
    assert rows["bytes"]["image"] == "<bytes>" and rows["text"]["image"] is None
    for key in ("rel", "abs", "gen", "bytes"):
        r = rows[key]
        assert (r["image_width"], r["image_height"]) == (64, 48) and len(r["image_scores"]) == 4, key
        assert r["image_box"] == [[0, 0, 32, 24], [32, 0, 64, 24], [0, 24, 32, 48], [32, 24, 64, 48]], key
    assert rows["text"]["image_scores"] is None and rows["text"]["unit_text"]
    assert len(rows["gen"]["target_tokens"]) <= 2
    manifest = json.loads(open(f"{summary.location}/_manifest.json").read())
    assert manifest["schema_version"] == SCHEMA_VERSION == 2


def test_scores_equal_the_python_api(image_run):
    _, _, rows, model_dir, data, _ = image_run
    lm = load_model(str(model_dir), device="cpu")
    e = Explainer(lm, AtManConfig()).explain(PROMPT, " red", images=[data / "red.png"], image_grid="2x2")
    np.testing.assert_allclose(
        rows["rel"]["image_scores"], e.image_scores, rtol=1e-4, atol=1e-5
    )  # other batch mates: float noise
    np.testing.assert_allclose(rows["rel"]["scores"], e.scores, rtol=1e-4, atol=1e-5)  # other batch mates: float noise


def test_image_units_view(image_run):
    spec, *_ = image_run
    con = connect(spec.output.root)
    got = con.execute(
        "SELECT prompt_id, count(*), min(rank), max(rank) FROM image_units GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert got == [(k, 4, 1, 4) for k in ("abs", "bytes", "gen", "rel")]
    box = con.execute("SELECT box FROM image_units WHERE prompt_id = 'rel' AND unit_index = 3").fetchone()[0]
    assert box == [32, 24, 64, 48]


def test_images_on_s3(tmp_path, s3_server, s3_bucket, tokenizer):  # noqa: F811
    """Input and images in a bucket (a real SeaweedFS on 127.0.0.1): a relative path resolves next to the input
    file, an s3:// URI is read as it is, a missing object is a skipped row naming it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fs = s3_server.filesystem()
    png = io.BytesIO()
    picture((255, 0, 0)).save(png, format="PNG")
    fs.pipe_file(f"{s3_bucket}/in/red.png", png.getvalue())
    fs.pipe_file(f"{s3_bucket}/pictures/also-red.png", png.getvalue())
    rows = [
        {"id": "rel", "prompt": PROMPT, "target": " red", "image": "red.png"},
        {"id": "uri", "prompt": PROMPT, "target": " red", "image": f"s3://{s3_bucket}/pictures/also-red.png"},
        {"id": "missing", "prompt": PROMPT, "target": " red", "image": f"s3://{s3_bucket}/in/nope.png"},
    ]
    fs.pipe_file(f"{s3_bucket}/in/a.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    model_dir = save_tiny_llava(tmp_path / "model", tokenizer)
    (tmp_path / "job.yaml").write_text(
        f"name: s3images\nmodel: {{id: {model_dir}}}\n"
        f"input: {{path: 's3://{s3_bucket}/in/a.jsonl', image_column: image}}\n"
        f"output: {{root: 's3://{s3_bucket}/out'}}\nmethod: {{image_grid: 2x2}}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **s3_server.env()}
    atman = str(Path(sys.executable).parent / "atman")
    out = subprocess.run([atman, "run", "job.yaml", "--run-id", "s1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = fs.glob(f"{s3_bucket}/out/model=*/run_date=*/run_id=s1")
    got = {r["prompt_id"]: r for r in ds.dataset(run_dir, filesystem=fs, format="parquet").to_table().to_pylist()}
    assert got["rel"]["status"] == "ok" and got["rel"]["image"] == f"s3://{s3_bucket}/in/red.png"
    assert got["uri"]["status"] == "ok" and got["uri"]["image_scores"] == pytest.approx(got["rel"]["image_scores"])
    assert got["missing"]["status"] == "skipped"
    assert got["missing"]["error"] == f"image: s3://{s3_bucket}/in/nope.png does not exist"


def test_report_draws_the_image_maps_in_a_browser(image_run, browser, tmp_path):  # noqa: F811
    """`atman report` on the image run: each image row shows its map as an inline PNG (tinted by score, the
    strongest box most), the page loads in headless Chromium without errors; a screenshot is taken (kept with
    ATMAN_TEST_ARTIFACTS)."""
    import base64
    import re
    import subprocess
    import sys
    from pathlib import Path

    from browser import console_errors, keep

    spec, _, rows, *_ = image_run
    page = tmp_path / "report.html"
    atman = str(Path(sys.executable).parent / "atman")
    out = subprocess.run([atman, "report", spec.output.root, "--out", str(page)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    text = page.read_text()
    maps = re.findall(r"<img class='image-map' alt='image units of ([^']+)' src='data:image/png;base64,([^']+)'", text)
    assert sorted(k for k, _ in maps) == ["abs", "bytes", "gen", "rel"]
    assert "boxes only: the image was inline bytes" in text
    drawn = Image.open(io.BytesIO(base64.b64decode(dict(maps)["rel"]))).convert("RGB")
    scores = rows["rel"]["image_scores"]
    strongest = int(np.argmax(np.abs(scores)))
    x0, y0, x1, y1 = (int(v) for v in rows["rel"]["image_box"][strongest])
    original = np.asarray(picture((255, 0, 0)), dtype=float)[y0:y1, x0:x1]
    change = np.abs(np.asarray(drawn, dtype=float)[y0:y1, x0:x1] - original).max()
    assert drawn.size == (64, 48) and change > 20, "the strongest box is tinted"
    dom, log = browser.load(page, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and 'data-errors="0"' in body and console_errors(log) == []
    png = browser.screenshot(page, tmp_path / "report-images.png", tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep(png)  # ATMAN_TEST_ARTIFACTS: for a person to look at after the run


def test_show_prints_the_image_units_and_writes_the_map(image_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    spec, *_ = image_run
    atman = str(Path(sys.executable).parent / "atman")
    png = tmp_path / "rel.png"
    out = subprocess.run([atman, "show", spec.output.root, "rel", "--overlay", str(png)], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "COLUMNS": "160"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "image units" in out.stdout and "box (x0, y0, x1, y1)" in out.stdout and f"wrote {png}" in out.stdout
    assert Image.open(png).size == (64, 48)
    text = subprocess.run([atman, "show", spec.output.root, "text", "--overlay", str(png)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert text.returncode == 2 and "--overlay: 'text' has no image units" in text.stderr


def test_the_map_falls_back_to_the_boxes_and_says_why(image_run, tmp_path):
    """show and report draw a row's map over its image; where the image cannot be read any more, over a grey canvas
    of the recorded size, with the reason naming the file (gone, not an image, another size, or inline bytes)."""
    from pipeline.overlay import row_overlay, tint

    _, _, rows, _, data, _ = image_run
    row = rows["rel"]
    boxes = [(0, tuple(b)) for b in row["image_box"]]
    drawn, why = row_overlay(row)
    assert why is None
    assert np.array_equal(
        np.asarray(drawn), np.asarray(tint([Image.open(data / "red.png")], boxes, row["image_scores"])[0])
    )
    grey = np.asarray(tint([Image.new("RGB", (64, 48), (235, 235, 235))], boxes, row["image_scores"])[0])

    small = tmp_path / "small.png"
    picture((255, 0, 0)).resize((32, 24)).save(small)
    cases = {
        str(tmp_path / "gone.png"): f"{tmp_path / 'gone.png'} does not exist",
        str(data / "bad.png"): f"{data / 'bad.png'}: ",
        str(small): f"{small} is 32x24 now, not 64x48",
        "<bytes>": "the image was inline bytes, which the output does not keep",
    }
    for ref, reason in cases.items():
        canvas, why = row_overlay({**row, "image": ref})
        assert why is not None and why.startswith(reason), (ref, why)
        assert np.array_equal(np.asarray(canvas), grey), ref
