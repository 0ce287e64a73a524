"""The notebooks run headless, top to bottom, on the embedded phantom set (tiny step counts via environment variables),
and are committed without outputs."""

import json
import os
from pathlib import Path

import pytest
from conftest import REPO

NOTEBOOKS = ("01_finetune_vit_walkthrough.ipynb", "02_mae_reconstructions.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    cells = json.loads((REPO / "notebooks" / name).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    # Cells call the library: no training loop or model code copied into the notebook.
    source = "\n".join("".join(c["source"]) for c in code)
    assert "def " not in source and "class " not in source and ".backward(" not in source


@pytest.mark.parametrize(
    "name, env, expected",
    [
        (
            "01_finetune_vit_walkthrough.ipynb",
            {"HF_MEDVIS_NB_MAE_STEPS": "2", "HF_MEDVIS_NB_FT_STEPS": "2", "HF_MEDVIS_NB_BOOTSTRAP": "20"},
            ("vit/model.safetensors", "eval/roc.png", "eval/metrics.json", "split/split_report.json"),
        ),
        (
            "02_mae_reconstructions.ipynb",
            {"HF_MEDVIS_NB_MAE_STEPS": "4", "HF_MEDVIS_NB_SAVE_EVERY": "2"},
            ("reconstructions-checkpoint-2.png", "reconstructions-checkpoint-4.png"),
        ),
    ],
)
@pytest.mark.slow
def test_notebook_executes_headless(name, env, expected, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    out = tmp_path / "nb"
    for key, value in {
        "HF_MEDVIS_NB_OUT": str(out),
        "HF_MEDVIS_NB_PATIENTS": "10",
        "OMP_NUM_THREADS": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        **env,
    }.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    for relative in expected:
        assert (out / relative).is_file(), relative
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2  # the figures were displayed
    assert not any(Path(p).exists() for p in [REPO / "notebooks" / "outputs"])
    assert os.environ["HF_MEDVIS_NB_OUT"] == str(out)
