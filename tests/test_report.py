"""``OUT/report.html`` of `hf-medvis evaluate`: self-contained (every image a data: URI, nothing to fetch), every text
escaped, sections present exactly when metrics.json has their keys; and rendered by a real browser (headless Chromium)
without a console error, every image decoded, its numbers those of metrics.json."""

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from test_evaluate_predict import MULTI, _save_classifier
from test_operating_points import _split_by_patient

from hf_medvis.cli import main as cli_main
from hf_medvis.evaluation.report import class_counts, write_report

CHROMIUM = "chromium"
URL = re.compile(r"\b(?:https?|ftp|wss?)://", re.IGNORECASE)


class _Page(HTMLParser):
    """The tags, attributes and text of a page, as a browser's parser splits them."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self) -> set[str]:
        return {attrs["id"] for _, attrs in self.tags if attrs.get("id")}

    def images(self) -> list[bytes]:
        """The bytes of every <img>, decoded from its data: URI (anything else fails)."""
        images = []
        for tag, attrs in self.tags:
            if tag == "img":
                head, _, payload = attrs["src"].partition(",")
                assert head == "data:image/png;base64", head[:80]
                images.append(base64.b64decode(payload, validate=True))
        return images


def _png(colour: int, size=(6, 4)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_self_contained(page: str, parsed: _Page) -> None:
    """Nothing a browser would fetch: no URL anywhere, no script, stylesheet link or external source."""
    assert not URL.search(page), URL.search(page)
    for tag, attrs in parsed.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for name in ("src", "href", "srcset", "data"):
            value = attrs.get(name)
            assert value is None or value.startswith("data:"), (tag, name, value[:60])


def test_report_sections_follow_the_metrics_and_every_text_is_escaped(tmp_path):
    """Without operating points, subgroups or examples their sections are absent; with them present. A class name,
    provenance value or caption with markup is shown as text, never parsed as HTML; the images are the bytes given."""
    names = ["<script>alert(1)</script>", "Effusion & more"]
    truth = np.array([[1, 0], [0, 1], [1, -1], [0, 0], [1, 1]])
    metrics = {
        f"auroc_{names[0]}": 0.75,
        f"auroc_{names[0]}_ci95_low": 0.5,
        f"auroc_{names[0]}_ci95_high": 0.9,
        "auroc_macro": 0.7,
        "images": 5,
        "patients": 3,
        "problem_type": "multi_label_classification",
        "calibration": {names[0]: {"ece": 0.1, "brier": 0.2}},
    }
    provenance = {"Model": "<b>bold</b>", "Data": 'a "quoted" & <odd> folder'}
    page = write_report(tmp_path, metrics, names, provenance=provenance, counts=class_counts(truth, names)).read_text()
    parsed = _Page(page)
    _assert_self_contained(page, parsed)
    assert {tag for tag, _ in parsed.tags}.isdisjoint({"b", "odd"})  # markup in values stays text
    text = "".join(parsed.text)
    for value in (*names, *provenance.values()):
        assert value in text, value
    assert {"provenance", "per-class", "calibration"} <= parsed.ids()
    assert parsed.ids().isdisjoint({"operating-points", "subgroups", "examples", "curves"})
    assert parsed.images() == []  # no figure files in tmp_path, none invented

    # The same with every optional key, the figure files evaluate writes, and two examples.
    figures = {name: _png(i * 40) for i, name in enumerate(("roc.png", "pr.png", "reliability.png", "subgroups.png"))}
    for name, data in figures.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "confusion.png").write_bytes(_png(250))  # a single-label figure: not shown for a multi-label model
    metrics["operating_point"] = {"rule": "youden", "validation": "val.csv, 9 images, 4 patients"}
    metrics["operating_points"] = {names[0]: {"threshold": 0.4, "sensitivity": 0.8, "specificity": 0.6}}
    metrics["operating_points_without_threshold"] = {names[1]: "no <positives>"}
    metrics["subgroups"] = {"Sex <col>": {"F": {"images": 3, "patients": 2, "auroc_macro": 0.6}}}
    examples = [("heatmap <1>", _png(10)), ("heatmap & 2", _png(20))]
    page = write_report(tmp_path, metrics, names, provenance=provenance, examples=examples).read_text()
    parsed = _Page(page)
    _assert_self_contained(page, parsed)
    assert {"operating-points", "subgroups", "examples", "curves"} <= parsed.ids()
    text = "".join(parsed.text)
    assert all(s in text for s in ("no <positives>", "Sex <col>", "heatmap <1>", "heatmap & 2"))
    expected = [figures[n] for n in ("roc.png", "pr.png", "reliability.png", "subgroups.png")] + [_png(10), _png(20)]
    assert parsed.images() == expected
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(tmp_path, metrics, names, provenance=provenance, examples=[("x", b"GIF89a")])

    # A single-label model: its confusion matrix beside the curves, accuracy and macro F1 (no per-class F1) as a line.
    single = {"auroc_A": 0.8, "auroc_B": 0.7, "auroc_macro": 0.75, "accuracy": 0.625, "f1_macro": 0.5}
    single["problem_type"] = "single_label_classification"
    parsed = _Page(write_report(tmp_path, single, ["A", "B"], provenance={}).read_text())
    assert parsed.images()[:3] == [figures["roc.png"], figures["pr.png"], _png(250)]
    header = [text for text in parsed.text if text.strip()]
    assert "F1" not in header and "accuracy (argmax class): 0.625; macro F1 (argmax class): 0.500" in header


def _chromium() -> str:
    found = shutil.which(CHROMIUM)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs the Debian package `chromium`)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return found


# Appended to a copy of the report: once the page has loaded, every image's decoded width and the rendered text
# (innerText: what the layout shows) go into an attribute that --dump-dom prints.
PROBE = (
    "<script>window.addEventListener('load', () => { document.documentElement.setAttribute('data-probe', "
    "JSON.stringify({widths: Array.from(document.images, i => i.naturalWidth), text: document.body.innerText})); "
    "});</script>"
)


def _render(report: Path, tmp_path: Path) -> tuple[dict, str]:
    """Chromium opens a copy of ``report`` with PROBE appended: (the probe's result, the browser's log)."""
    probe_copy = tmp_path / f"probe_{report.name}"
    probe_copy.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        probe_copy.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    root = next(attrs for tag, attrs in _Page(result.stdout).tags if tag == "html")
    return json.loads(root["data-probe"]), result.stderr


@pytest.mark.slow
def test_report_renders_in_chromium_with_every_image_and_the_numbers_of_metrics_json(tmp_path, phantom_dir):
    """evaluate (with operating points and subgroups) -> report.html, opened by headless Chromium: no console message
    (no script error, nothing blocked), every <img> decoded (naturalWidth > 0; a broken one is caught), nothing fetched;
    the rendered per-class rows read the positives and negatives counted from test.csv and metrics.json's AUROC with
    its CI, the operating points metrics.json's sensitivity and specificity with CIs."""
    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, _, test_rows = _split_by_patient(phantom_dir, tmp_path / "split")
    out = tmp_path / "eval"
    args = ["evaluate", "--model", model, "--data", phantom_dir / "images", "--labels", test_csv, "--out", out]
    extra = ["--bootstrap", "50", "--no-card", "--thresholds-from", val_csv, "--subgroups", "Patient Gender"]
    assert cli_main([str(a) for a in [*args, *extra]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    report = out / "report.html"
    page = report.read_text()
    parsed = _Page(page)
    _assert_self_contained(page, parsed)
    # Each figure evaluate wrote, embedded byte for byte.
    expected = [(out / name).read_bytes() for name in ("roc.png", "pr.png", "reliability.png", "subgroups.png")]
    images = parsed.images()
    assert images[: len(expected)] == expected
    assert len(images) > len(expected)  # then the examples: heatmaps of the picked images (test_heatmaps checks them)

    probe, log = _render(report, tmp_path)
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert len(probe["widths"]) == len(images) and all(width > 0 for width in probe["widths"]), probe["widths"]
    lines = probe["text"].splitlines()

    def row(first: str) -> list[str]:
        found = [line.split("\t") for line in lines if line.split("\t")[0] == first]
        assert found, (first, lines[:60])
        return found[0]

    def with_ci(values: dict, key: str) -> str:
        return f"{values[key]:.3f} [{values[key + '_ci95_low']:.3f}, {values[key + '_ci95_high']:.3f}]"

    with open(test_csv, newline="") as f:
        findings = [r["Finding Labels"].split("|") for r in csv.DictReader(f)]
    assert f"Images\t{len(test_rows)}" in lines
    assert not any(r["Image Index"] in page for r in test_rows)  # counts, never an image name
    for name in MULTI.names:
        positives = sum(name in labels for labels in findings)
        cells = row(name)  # the first row of the name: the per-class table
        assert cells[:4] == [name, str(positives), str(len(findings) - positives), with_ci(metrics, f"auroc_{name}")]
        assert cells[4] == f"{metrics[f'ap_{name}']:.3f}"
    assert row("macro")[3] == with_ci(metrics, "auroc_macro")
    points = metrics["operating_points"]
    assert points, metrics.get("operating_points_without_threshold")
    rendered = {cells[0]: cells for cells in (line.split("\t") for line in lines) if len(cells) == 6}
    for name, point in points.items():
        assert rendered[name][2:4] == [with_ci(point, "sensitivity"), with_ci(point, "specificity")]
    for value, result in metrics["subgroups"]["Patient Gender"].items():
        if not value.startswith("_"):
            macro = with_ci(result, "auroc_macro") if "auroc_macro" in result else "n/a"
            assert row(value)[1:4] == [str(result["images"]), str(result["patients"]), macro]

    # The check itself: an image whose data does not decode is reported with width 0.
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAR", 1))
    probe, _ = _render(broken, tmp_path)
    assert probe["widths"][0] == 0 and all(width > 0 for width in probe["widths"][1:])
