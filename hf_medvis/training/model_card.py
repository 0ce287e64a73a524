"""Model cards (README.md with Hub metadata). They never carry patient data, local paths or credentials: only what
describes the model and how it was trained."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NOT_FOR_CLINICAL_USE = (
    "**Not for clinical use.** This model is a research artifact. It has not been validated for diagnosis, triage or any "
    "other clinical decision, and must not be used as a medical device."
)


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def render_model_card(
    *,
    title: str,
    summary: str,
    metadata: Mapping[str, Any],
    sections: Mapping[str, str | Mapping[str, Any]],
) -> str:
    """Front matter from ``metadata`` (huggingface_hub ModelCardData), then one section per entry (text or a table)."""
    from huggingface_hub import ModelCardData

    card_data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None})
    parts = [f"---\n{card_data.to_yaml()}\n---", f"# {title}", summary]
    for heading, body in sections.items():
        parts.append(f"## {heading}")
        parts.append(_table(body) if isinstance(body, Mapping) else str(body))
    parts += ["## Intended use and limitations", NOT_FOR_CLINICAL_USE]
    return "\n\n".join(parts) + "\n"


def write_model_card(output_dir: str | os.PathLike, content: str) -> Path:
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)
    return path
