"""Segmentation outside the data plane: presets give a segmenter no MAE decoder, and ``hf-medvis size`` refuses
segmentation with one line rather than sizing a classifier under its name."""

from __future__ import annotations

from hf_medvis.cli import main
from hf_medvis.core.presets import load_presets, preset_fields
from hf_medvis.core.tasks import CLASSIFICATION, MAE, SEGMENTATION


def test_only_mae_keeps_the_mae_decoder_fields():
    for name, spec in load_presets().items():
        decoder = {key for key in spec if key.startswith("decoder_")}
        assert decoder and decoder <= set(preset_fields(name, MAE)), name
        for task in (CLASSIFICATION, SEGMENTATION):
            fields = preset_fields(name, task)
            assert fields == {key: value for key, value in spec.items() if key not in decoder}, (name, task)


def test_size_refuses_segmentation_in_one_line(capsys):
    assert main(["size", "--model", "tiny", "--task", SEGMENTATION, "--image-size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not size segmentation" in err and "--task classification" in err
