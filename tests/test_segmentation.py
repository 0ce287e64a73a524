"""Segmentation model, metrics, inference and recipe: Dice and IoU equal scikit-learn's per image; the bootstrap CIs are
a direct patient resample; the model learns a fixed batch; a saved model loads in plain transformers with the same
logits, and transformers' pipeline draws the masks `SegmentationPredictor` draws; the recipe trains, evaluates with
CIs, and a resumed run continues the uninterrupted one exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_checkpoints, load_recipe, run_recipe
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score
from test_resume import assert_continues_exactly

from hf_medvis.data.phantoms import MASK_CLASSES, phantom_mask, plan_phantoms, render_phantom
from hf_medvis.evaluation.segment import SegmentationPredictor, evaluate_masks, write_mask_outputs
from hf_medvis.evaluation.segmentation_metrics import (
    build_segmentation_compute_metrics,
    confusion_counts,
    logits_to_counts,
    mask_counts,
    segmentation_metrics,
    segmentation_metrics_with_ci,
)
from hf_medvis.models.build import ModelSetupError
from hf_medvis.models.param_groups import vit_param_groups
from hf_medvis.models.segmentation import build_segmentation_processor, build_segmenter, load_segmenter

NAMES = ("background", "lung", "heart", "nodule")


def random_masks(rng, images=10, shape=(12, 17), classes=4):
    truth = rng.integers(0, classes, (images, *shape))
    truth[0][truth[0] == 3] = 1  # image 0 has no nodule: it must not count for the nodule's scores
    truth[1, :3] = 255  # unlabelled rows: not scored
    predicted = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, classes, truth.shape)) % classes
    return predicted, truth


def sklearn_scores(predicted, truth, classes):
    """Per image and class (Dice, IoU) by scikit-learn on the labelled pixels; NaN where the truth lacks the class."""
    dice = np.full((len(truth), classes), np.nan)
    iou = np.full((len(truth), classes), np.nan)
    for i, (p, t) in enumerate(zip(predicted, truth, strict=True)):
        valid = t != 255
        for c in range(classes):
            if (t[valid] == c).any():
                dice[i, c] = f1_score(t[valid] == c, p[valid] == c)
                iou[i, c] = jaccard_score(t[valid] == c, p[valid] == c)
    return dice, iou


def test_dice_and_iou_equal_scikit_learn_per_image():
    predicted, truth = random_masks(np.random.default_rng(0))
    metrics = segmentation_metrics(confusion_counts(predicted, truth, 4).numpy(), NAMES)
    dice, iou = sklearn_scores(predicted, truth, 4)
    for c, name in enumerate(NAMES):
        assert metrics[f"dice_{name}"] == pytest.approx(np.nanmean(dice[:, c]), abs=1e-12), name
        assert metrics[f"iou_{name}"] == pytest.approx(np.nanmean(iou[:, c]), abs=1e-12), name
    assert metrics["dice_macro"] == pytest.approx(np.mean(np.nanmean(dice[:, 1:], axis=0)), abs=1e-12)
    assert metrics["iou_macro"] == pytest.approx(np.mean(np.nanmean(iou[:, 1:], axis=0)), abs=1e-12)
    # masks of different sizes (evaluation at each input's own size) give the same counts
    ragged = mask_counts([p[: 5 + i] for i, p in enumerate(predicted)], [t[: 5 + i] for i, t in enumerate(truth)], 4)
    for i in range(len(truth)):
        rows = slice(0, 5 + i)
        np.testing.assert_array_equal(
            ragged[i], confusion_counts(predicted[i : i + 1, rows], truth[i : i + 1, rows], 4)[0]
        )
    with pytest.raises(ValueError, match=r"label masks hold values outside 0..3"):
        confusion_counts(predicted, np.where(truth == 255, 255, truth + 1), 4)
    # a class no image has is not scored (rather than 0 or 1), and stays out of the macro average
    only_two = np.minimum(truth, 1) * (truth != 255) + 255 * (truth == 255)
    fewer = segmentation_metrics(confusion_counts(np.minimum(predicted, 1), only_two, 4).numpy(), NAMES)
    assert "dice_heart" not in fewer and fewer["dice_macro"] == fewer["dice_lung"]


def test_bootstrap_intervals_are_a_direct_patient_resample():
    predicted, truth = random_masks(np.random.default_rng(1), images=12)
    groups = ["p3", "p1", "p1", "p2", "p3", "p0", "p4", "p4", "p2", "p5", "p0", "p5"]
    n, seed = 200, 7
    metrics = segmentation_metrics_with_ci(confusion_counts(predicted, truth, 4).numpy(), groups, NAMES,
                                           n_resamples=n, seed=seed)  # fmt: skip
    dice, _ = sklearn_scores(predicted, truth, 4)
    patients = sorted(set(groups))
    rng = np.random.default_rng(seed)
    macro = []
    for _ in range(n):
        chosen = rng.integers(0, len(patients), len(patients))
        rows = [i for p in chosen for i, g in enumerate(groups) if g == patients[p]]
        macro.append(np.mean(np.nanmean(dice[rows, 1:], axis=0)))
    assert metrics["dice_macro_ci95_low"] == pytest.approx(np.quantile(macro, 0.025), abs=1e-12)
    assert metrics["dice_macro_ci95_high"] == pytest.approx(np.quantile(macro, 0.975), abs=1e-12)
    assert metrics["dice_macro_ci95_low"] <= metrics["dice_macro"] <= metrics["dice_macro_ci95_high"]
    assert metrics["images"] == 12 and metrics["patients"] == 6


def test_evaluation_keeps_counts_of_the_upsampled_prediction():
    """The Trainer's evaluation hook scores the logits upsampled to the labels' size, as the pipeline does."""
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(size=(3, 4, 4, 5))).float()
    labels = torch.from_numpy(rng.integers(0, 4, (3, 16, 20)))
    counts = logits_to_counts(logits, labels)
    upsampled = torch.nn.functional.interpolate(logits, size=(16, 20), mode="bilinear", align_corners=False)
    predicted = upsampled.argmax(1).numpy()
    for i in range(3):
        for c in range(4):
            p, t = predicted[i] == c, labels[i].numpy() == c
            assert counts[i, c].tolist() == [(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]
    from transformers import EvalPrediction

    compute = build_segmentation_compute_metrics(NAMES)
    assert compute(EvalPrediction(predictions=counts.numpy(), label_ids=labels.numpy())) == segmentation_metrics(
        counts.numpy(), NAMES
    )


def phantom_batch(size=32, count=8):
    plan = plan_phantoms(patients=count, seed=0)[:count]
    images = torch.stack([torch.from_numpy(render_phantom(p, size)).expand(3, size, size) for p in plan])
    masks = torch.stack([torch.from_numpy(phantom_mask(p, size)).long() for p in plan])
    return (images - 0.5) / 0.25, masks


def test_the_model_learns_a_fixed_batch_and_layer_decay_reaches_its_encoder():
    torch.manual_seed(0)
    model, report = build_segmenter(None, MASK_CLASSES, image_size=32, patch_size=8, decoder_hidden_size=32)
    assert report.source_type == "new"
    pixels, masks = phantom_batch()
    masks[:, :2] = 255  # unlabelled rows
    groups = vit_param_groups(model, 1e-2, 0.0, layer_decay=0.5)
    by_name = {name: group["lr_scale"] for group in groups for name in group["names"]}
    assert by_name["decode_head.classifier.weight"] == 1.0 and by_name["vit.embeddings.cls_token"] == 0.5**3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(pixel_values=pixels, labels=masks).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert logits.shape == (8, 4, 8, 8)  # 1/4 of the input (patch 8: one 2x upsampling)
    metrics = segmentation_metrics(logits_to_counts(logits, masks).numpy(), MASK_CLASSES)
    assert metrics["dice_lung"] > 0.5 and metrics["dice_background"] > 0.5


def test_a_saved_model_loads_in_transformers_and_its_pipeline_draws_the_predictor_masks(tiny_mae_dir, tmp_path):
    from transformers import AutoModelForSemanticSegmentation, ViTMAEForPreTraining, pipeline

    torch.manual_seed(0)
    model, report = build_segmenter(str(tiny_mae_dir), NAMES, decoder_hidden_size=32)
    assert "loaded" in report.summary() and any(k.startswith("decoder.") for k in report.dropped)
    assert all(k.startswith("decode_head.") for k in report.missing) and report.missing
    mae = ViTMAEForPreTraining.from_pretrained(tiny_mae_dir)
    torch.testing.assert_close(
        model.vit.embeddings.patch_embeddings.projection.weight, mae.vit.embeddings.patch_embeddings.projection.weight
    )
    out = tmp_path / "seg"
    model.save_pretrained(out)
    build_segmentation_processor(64, [0.5] * 3, [0.25] * 3).save_pretrained(out)
    plain = AutoModelForSemanticSegmentation.from_pretrained(out, trust_remote_code=True).eval()
    assert type(plain).__module__.startswith("transformers_modules")  # the file saved in the folder, not ours
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)

    # a portrait grey X-ray: the pipeline's masks at the input's size are the predictor's
    plan = plan_phantoms(patients=2, seed=0)[0]
    grey = Image.fromarray((render_phantom(plan, 80) * 255).round().astype(np.uint8)).resize((61, 101))
    grey.save(tmp_path / "portrait.png")
    predictor = SegmentationPredictor(out)
    [mask] = predictor.predict_masks([str(tmp_path / "portrait.png")])
    assert mask.shape == (101, 61)
    segmenter = pipeline("image-segmentation", model=str(out), trust_remote_code=True)
    assert type(segmenter).__name__ == "ViTSegmentationPipeline"  # the saved one: no "model not supported" error logged
    segments = segmenter(str(tmp_path / "portrait.png"))
    drawn = np.full((101, 61), 255, dtype=np.uint8)
    for segment in segments:
        drawn[np.asarray(segment["mask"]) > 0] = NAMES.index(segment["label"])
    np.testing.assert_array_equal(drawn, mask)

    line = write_mask_outputs(str(tmp_path / "portrait.png"), mask, tmp_path / "pred", predictor.class_names)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred" / "portrait_mask.png")), mask)
    overlay = np.asarray(Image.open(tmp_path / "pred" / "portrait_overlay.png"))
    assert overlay.shape == (101, 61, 3)
    background = mask == 0  # left as it was: the grey image itself
    np.testing.assert_array_equal(overlay[background][:, 0], np.asarray(grey)[background])
    assert line["pixels"] == {n: int((mask == i).sum()) for i, n in enumerate(NAMES)}
    json.dumps(line)  # one JSON line per image

    # evaluate: the predictor's masks scored against true masks at the input's size (scikit-learn per image)
    truth = [np.random.default_rng(i).integers(0, 4, (101, 61)).astype(np.uint8) for i in range(2)]
    scored = evaluate_masks(predictor, [str(tmp_path / "portrait.png")] * 2, truth, ["a", "b"], n_resamples=0)
    dice, _ = sklearn_scores(np.stack([mask, mask]), np.stack(truth), 4)
    assert scored["dice_lung"] == pytest.approx(np.nanmean(dice[:, 1]), abs=1e-12) and scored["patients"] == 2

    # the recipe's own model loads back with our class; another kind of folder is one line
    torch.testing.assert_close(
        load_segmenter(out).eval()(pixel_values=pixels).logits, plain(pixel_values=pixels).logits
    )
    with pytest.raises(ModelSetupError, match="is not a segmentation model"):
        load_segmenter(tiny_mae_dir)


RECIPE_ARGS = (
    "--per_device_train_batch_size 8 --dataloader_num_workers 2 --max_steps 4 --logging_steps 1 --save_steps 1 "
    "--save_total_limit 20 --eval_strategy no --load_best_model_at_end false --hidden_dropout_prob 0.1 "
    "--ci_bootstrap_samples 20 --validation_split_percentage 25 --decoder_hidden_size 32 --seed 7"
).split()


@pytest.mark.slow
def test_the_recipe_trains_evaluates_and_resumes_exactly(masked_phantom_dir, tmp_path):
    recipe = load_recipe("finetune_segmentation")
    data = ["--train_data", str(masked_phantom_dir / "images"), "--masks_dir", str(masked_phantom_dir / "masks")]
    data += ["--labels_file", str(masked_phantom_dir / "labels.csv")]
    reference = tmp_path / "reference"
    log = run_recipe(recipe, [*data, *RECIPE_ARGS, "--output_dir", str(reference)])
    assert "mask classes: 0 background, 1 lung, 2 heart, 3 nodule" in log
    results = json.loads((reference / "all_results.json").read_text())
    assert results["global_step"] == 4
    for key in ("eval_dice_macro", "eval_iou_macro", "eval_dice_lung"):
        assert 0 <= results[f"{key}_ci95_low"] <= results[key] <= results[f"{key}_ci95_high"] <= 1, key
    card = (reference / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and f"value: {round(results['eval_dice_macro'], 4)}" in card
    assert (reference / "modeling_hf_medvis_seg.py").is_file()

    out = copy_checkpoints(reference, (2,), tmp_path / "resumed")
    log = run_recipe(recipe, [*data, *RECIPE_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "last"])
    assert "tensors restored" in log
    assert_continues_exactly(reference, out, 2, 4)  # the same crops of image and mask, the same dropout
    assert json.loads((out / "all_results.json").read_text())["eval_dice_macro"] == results["eval_dice_macro"]

    # `hf-medvis evaluate` and `predict` dispatch on the saved segmentation model
    from hf_medvis.cli import main as cli_main

    images, masks_dir = masked_phantom_dir / "images", masked_phantom_dir / "masks"
    sources = sorted(str(p) for p in images.glob("*.png"))[:6]
    cli = ["evaluate", "--model", str(reference), "--data", str(images), "--masks", str(masks_dir)]
    assert cli_main([*cli, "--out", str(tmp_path / "eval"), "--bootstrap", "50"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    predictor = SegmentationPredictor(reference)
    every = sorted(str(p) for p in images.glob("*.png"))
    truth = [np.asarray(Image.open(masks_dir / Path(p).name)) for p in every]
    direct = segmentation_metrics(mask_counts(predictor.predict_masks(every), truth, len(NAMES)), NAMES)
    assert metrics["dice_macro"] == pytest.approx(direct["dice_macro"]) and metrics["images"] == len(every)
    assert cli_main(["evaluate", "--model", str(reference), "--data", str(images), "--out", str(tmp_path / "x")]) == 2

    twin = tmp_path / "twin"  # the same file name in another folder: its outputs get their own stem
    twin.mkdir()
    (twin / Path(sources[0]).name).write_bytes(Path(sources[1]).read_bytes())
    out = tmp_path / "masks_out"
    lines = tmp_path / "lines.jsonl"
    files = [*sources, str(twin / Path(sources[0]).name)]
    assert cli_main(["predict", "--model", str(reference), *files, "--out", str(out), "--output", str(lines)]) == 0
    written = [json.loads(line) for line in lines.read_text().splitlines()]
    expected = predictor.predict_masks(files)
    assert len({line["mask"] for line in written}) == len(files)
    for line, mask in zip(written, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(line["mask"])), mask)
        assert sum(line["pixels"].values()) == mask.size
