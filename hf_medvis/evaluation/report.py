"""``OUT/report.html``: one self-contained page of an evaluation for a clinical reader.

Everything it shows comes from ``metrics.json`` (as ``hf-medvis evaluate`` writes it), the figures beside it and a few
facts the metrics do not hold (which model, which data, counts per class). The page needs nothing else to render: the
figures are embedded as base64 ``data:`` URIs, the style sheet is inline, and there is no script, font or link to
fetch, so it opens offline, from an e-mail attachment or an air-gapped share. Every text value is HTML-escaped. No
patient id or image name enters it: counts only.

Why our own few lines of HTML rather than a templating or notebook-export package: the page is a handful of tables and
images; Jinja2 or nbconvert would add a dependency (and nbconvert a notebook run) for string formatting that
``html.escape`` makes safe.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.param_count import count_parameters
from ..core.storage import write_text_atomic
from .metrics import number_text, value_with_ci

REPORT_NAME = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The figures `hf-medvis evaluate` writes beside metrics.json, by section (each section embeds only its own).
CURVE_FIGURES = (("roc.png", "ROC curves"), ("pr.png", "Precision-recall curves"))
CONFUSION_FIGURE = ("confusion.png", "Confusion matrix (argmax class)")
RELIABILITY_FIGURE = ("reliability.png", "Reliability diagrams")
SUBGROUP_FIGURE = ("subgroups.png", "Subgroup forest plot")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.macro td { font-weight: 600; background: #fafafa; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figure img { max-width: 520px; border: 1px solid #e2e2e2; }
/* heatmaps are the model's input size (often 64-224 px): shown at least 224 px wide, pixels kept sharp */
#examples figure { width: 240px; }
#examples figure img { width: 224px; image-rendering: pixelated; }
figcaption, .note { color: #555; font-size: 0.88em; }
"""


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(
    header: Sequence[str] | None, rows: Iterable[Sequence[str]], numeric_from: int = 1, classes: Sequence[str] = ()
) -> str:
    """An HTML table of text cells (escaped here), without a header row when ``header`` is None; cells from column
    ``numeric_from`` on are right-aligned numbers; ``classes`` gives rows a CSS class (``macro``)."""
    head = "".join(f"<th>{_text(h)}</th>" for h in header or ())
    body = []
    for i, row in enumerate(rows):
        css = f' class="{_text(classes[i])}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="num">{_text(cell)}</td>' if c >= numeric_from else f"<td>{_text(cell)}</td>"
            for c, cell in enumerate(row)
        )
        body.append(f"<tr{css}>{cells}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _image(png: bytes, alt: str) -> str:
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError(f"report image {alt!r} is not a PNG")
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _figure(png: bytes, caption: str) -> str:
    return f"<figure>{_image(png, caption)}<figcaption>{_text(caption)}</figcaption></figure>"


def _figures_from(out_dir: Path, figures: Iterable[tuple[str, str]]) -> str:
    """The figures of ``out_dir`` named in ``figures`` (file name, caption) that exist, side by side."""
    found = [_figure((out_dir / name).read_bytes(), caption) for name, caption in figures if (out_dir / name).is_file()]
    return f'<div class="figures">{"".join(found)}</div>' if found else ""


def class_counts(truth: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per class its positive and negative images (unknown labels, -1, counted in neither): the report's counts."""
    truth = np.asarray(truth)
    return {
        name: {"positives": int((truth[:, c] == 1).sum()), "negatives": int((truth[:, c] == 0).sum())}
        for c, name in enumerate(names)
    }


def describe_model(model_dir: str | os.PathLike, model: Any) -> dict[str, str]:
    """The report's model rows: the folder's name (not its full path), the architecture from the loaded model's
    config, and the training step and best checkpoint where the folder's ``trainer_state.json`` records them."""
    config = model.config
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    facts = [f"model_type {config.model_type}"]
    for attribute, template in (
        ("image_size", "{} px input"),
        ("patch_size", "{} px patches"),
        ("num_hidden_layers", "{} layers"),
        ("hidden_size", "hidden size {}"),
    ):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            facts.append(template.format(value))
    facts.append(f"{count_parameters(model):,} parameters")
    rows = {"Model": Path(os.fspath(model_dir).rstrip("/")).name or os.fspath(model_dir)}
    rows["Architecture"] = f"{architecture} ({', '.join(facts)})"
    rows["Training"] = _training_state(Path(model_dir))
    return rows


def _training_state(model_dir: Path) -> str:
    state_file = model_dir / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return "not recorded in the folder (no readable trainer_state.json)"
    text = f"{state.get('global_step', '?')} optimizer steps"
    if isinstance(state.get("epoch"), (int, float)):
        text += f" ({state['epoch']:.3g} epochs)"
    best = state.get("best_model_checkpoint")
    if best:  # which weights the folder holds (best or last) is the model card's to say: trainer_state does not
        text += f"; best validation checkpoint {Path(best).name}"
        if isinstance(state.get("best_metric"), (int, float)):
            text += f" (best metric {state['best_metric']:.4f})"
    return text


def write_report(
    out_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    provenance: Mapping[str, str],
    counts: Mapping[str, Mapping[str, int]] | None = None,
    examples: Sequence[tuple[str, bytes]] | None = None,
) -> Path:
    """``out_dir/report.html`` (written whole or not at all) from ``metrics`` (``metrics.json``'s content) and the
    figures ``hf-medvis evaluate`` wrote into ``out_dir``: provenance (``provenance``: label -> text, in order; the
    image and patient counts come from ``metrics``), the per-class table with 95% CIs and ``counts`` (class ->
    positives, negatives), ROC and precision-recall curves, the operating points, calibration, subgroups (each when
    ``metrics`` has it) and ``examples`` (caption, PNG bytes), e.g. heatmaps: captions say what an image shows (class,
    probability, label), never a patient id or file name. Returns the report's path."""
    out = Path(out_dir)
    problem_type = metrics.get("problem_type", "multi_label_classification")
    sections = [
        _provenance_section(metrics, provenance),
        _per_class_section(metrics, class_names, counts or {}),
        _curves_section(out, problem_type),
        _operating_points_section(metrics),
        _calibration_section(out, metrics),
        _subgroups_section(out, metrics, class_names),
        _examples_section(examples or []),
    ]
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Evaluation report: {_text(provenance.get('Model', 'model'))}</title>"
        f"<style>{_STYLE}</style></head><body>\n"
        f'<h1>Evaluation report</h1>\n<p class="note">hf-medvis {_text(__version__)}, generated {generated}. 95% '
        "confidence intervals come from a patient-level bootstrap (patients, not images, resampled).</p>\n"
        + "\n".join(section for section in sections if section)
        + "\n</body></html>\n"
    )
    path = out / REPORT_NAME
    write_text_atomic(path, page)
    return path


def _provenance_section(metrics: Mapping[str, Any], provenance: Mapping[str, str]) -> str:
    rows = [(label, value) for label, value in provenance.items()]
    rows += [("Images", str(metrics.get("images", "?"))), ("Patients", str(metrics.get("patients", "?")))]
    if "temperature" in metrics:
        fitted = metrics["temperature"].get("validation") or metrics["temperature"].get("fitted", "")
        scaled = ", ".join(f"{name} T={value:.3g}" for name, value in metrics["temperature"].get("values", {}).items())
        rows.append(("Probabilities", f"temperature-scaled ({scaled or 'no class'}; fitted on {fitted})"))
    return '<section id="provenance"><h2>Provenance</h2>' + _table(None, rows, numeric_from=2) + "</section>"


def _per_class_section(
    metrics: Mapping[str, Any], names: Sequence[str], counts: Mapping[str, Mapping[str, int]]
) -> str:
    families = [
        (key, label)
        for key, label in (("auroc", "AUROC [95% CI]"), ("ap", "AP"), ("f1", "F1"))
        if any(f"{key}_{name}" in metrics for name in names)
    ]
    calibration = metrics.get("calibration") or {}
    not_evaluated = set(metrics.get("not_evaluated") or ())
    header = ["class", "positives", "negatives", *(label for _, label in families)]
    if calibration:
        header += ["ECE", "Brier"]
    rows, classes = [], []
    for name in names:
        count = counts.get(name, {})
        row = [name, str(count.get("positives", "")), str(count.get("negatives", ""))]
        if name in not_evaluated:
            row += ["not evaluated (the data does not label it)"] + [""] * (len(header) - 4)
        else:
            row += [value_with_ci(metrics, f"{key}_{name}") for key, _ in families]
            if calibration:
                row += [
                    number_text(calibration.get(name, {}).get("ece")),
                    number_text(calibration.get(name, {}).get("brier")),
                ]
        rows.append(row)
        classes.append("")
    rows.append(["macro", "", "", *(value_with_ci(metrics, f"{key}_macro") for key, _ in families)])
    rows[-1] += [""] * (len(header) - len(rows[-1]))
    classes.append("macro")
    # Whole-set figures without a per-class value (single-label models: accuracy and macro F1 of the argmax class).
    tabled = {f"{key}_macro" for key, _ in families}
    overall = [
        f"{label}: {value_with_ci(metrics, key)}"
        for key, label in (("accuracy", "accuracy (argmax class)"), ("f1_macro", "macro F1 (argmax class)"))
        if key in metrics and key not in tabled
    ]
    note = f"<p>{_text('; '.join(overall))}</p>" if overall else ""
    return (
        '<section id="per-class"><h2>Per class</h2>'
        + _table(header, rows, classes=classes)
        + note
        + '<p class="note">AP: average precision. F1 at the probability threshold of the evaluation. ECE: expected '
        "calibration error over equal-mass bins. n/a: the class lacks positives or negatives here.</p></section>"
    )


def _curves_section(out: Path, problem_type: str) -> str:
    figures = list(CURVE_FIGURES)
    if problem_type == "single_label_classification":
        figures.append(CONFUSION_FIGURE)
    found = _figures_from(out, figures)
    return f'<section id="curves"><h2>ROC and precision-recall curves</h2>{found}</section>' if found else ""


def _operating_points_section(metrics: Mapping[str, Any]) -> str:
    if "operating_points" not in metrics:
        return ""
    points = metrics["operating_points"] or {}
    chosen = metrics.get("operating_point") or {}
    header = ["class", "threshold", *(f"{k} [95% CI]" for k in ("sensitivity", "specificity", "PPV", "NPV"))]
    rows = [
        [
            name,
            f"{point['threshold']:.4g}",
            *(value_with_ci(point, key) for key in ("sensitivity", "specificity", "ppv", "npv")),
        ]
        for name, point in points.items()
    ]
    without = metrics.get("operating_points_without_threshold") or {}
    listed = "".join(f"<li>{_text(name)}: {_text(reason)}</li>" for name, reason in without.items())
    return (
        '<section id="operating-points"><h2>Operating points</h2>'
        f"<p>Thresholds chosen by {_text(chosen.get('rule', '?'))} on {_text(chosen.get('validation', '?'))}, "
        "applied unchanged to the evaluated images.</p>"
        + (_table(header, rows) if rows else "")
        + (f"<p>No threshold:</p><ul>{listed}</ul>" if listed else "")
        + "</section>"
    )


def _calibration_section(out: Path, metrics: Mapping[str, Any]) -> str:
    if not metrics.get("calibration"):
        return ""
    figure = _figures_from(out, [RELIABILITY_FIGURE])
    temperature = metrics.get("temperature") or {}
    rows = [
        [
            name,
            f"{value:.4g}",
            *(
                number_text(temperature.get(f"validation_{key}", {}).get(name))
                for key in ("ece_before", "ece_after", "nll_before", "nll_after")
            ),
        ]
        for name, value in (temperature.get("values") or {}).items()
    ]
    without = temperature.get("without_temperature") or {}
    listed = "".join(f"<li>{_text(name)}: {_text(reason)}</li>" for name, reason in without.items())
    table = (
        "<h3>Temperature scaling</h3>"
        + _table(["class", "T", "val. ECE before", "val. ECE after", "val. NLL before", "val. NLL after"], rows)
        + (f"<p>No temperature:</p><ul>{listed}</ul>" if listed else "")
        if rows or listed
        else ""
    )
    return (
        '<section id="calibration"><h2>Calibration</h2>'
        f'{figure}<p class="note">ECE and Brier score per class are in the per-class table.</p>{table}</section>'
    )


def _subgroups_section(out: Path, metrics: Mapping[str, Any], names: Sequence[str]) -> str:
    subgroups = metrics.get("subgroups")
    if not subgroups:
        return ""
    parts = ['<section id="subgroups"><h2>Subgroups</h2>', _figures_from(out, [SUBGROUP_FIGURE])]
    for column, values in subgroups.items():
        header = ["value", "images", "patients", "macro AUROC [95% CI]", *(f"AUROC {name}" for name in names)]
        rows = []
        for value, result in values.items():
            if value.startswith("_"):
                continue
            too_small = result.get("too_small") or {}
            per_class = ["too few" if name in too_small else value_with_ci(result, f"auroc_{name}") for name in names]
            rows.append(
                [
                    value,
                    str(result.get("images", "")),
                    str(result.get("patients", "")),
                    value_with_ci(result, "auroc_macro"),
                    *per_class,
                ]
            )
        parts.append(f"<h3>{_text(column)}</h3>" + _table(header, rows))
        gap = (values.get("_largest_gap") or {}).get("auroc_macro")
        if gap:
            best, worst = gap["groups"]
            parts.append(
                f"<p>Largest gap in macro AUROC: {_text(best)} - {_text(worst)} = {number_text(gap['gap'])} (95% CI "
                f"{number_text(gap.get('ci95_low'))} to {number_text(gap.get('ci95_high'))})</p>"
            )
    parts.append('<p class="note">too few: fewer than 5 positives or negatives of the class in the subgroup.</p>')
    return "".join(parts) + "</section>"


def _examples_section(examples: Sequence[tuple[str, bytes]]) -> str:
    if not examples:
        return ""
    figures = "".join(_figure(png, caption) for caption, png in examples)
    note = (
        '<p class="note">Per class, the most confident true positives and false positives and the least confident '
        "false negatives at the threshold shown, each with the class's HiResCAM map (where the model looked) over the "
        "image the model saw.</p>"
    )
    return f'<section id="examples"><h2>Examples</h2>{note}<div class="figures">{figures}</div></section>'
