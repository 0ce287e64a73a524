"""Saliency maps (`hf-medvis predict --heatmap`): HiResCAM as defined, checked against a direct computation; the report's
example picks against a plain loop; the CLI's files and JSON; and, on a classifier trained on phantoms, the Nodule map
falling on the nodule the generator drew."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_medvis.cli import main as cli_main
from hf_medvis.data.labels import LabelSpec
from hf_medvis.evaluation.heatmaps import SaliencyExplainer, pick_examples
from hf_medvis.evaluation.predict import output_stems

MULTI = LabelSpec(("Cardiomegaly", "Effusion", "Nodule"), "multi_label_classification")


def _save_classifier(folder, spec, image_size=32, patch_size=8, pooling="cls", seed=0):
    """An untrained tiny classifier saved as the recipe saves one (weights, id2label, processor)."""
    from hf_medvis.models.build import build_image_processor
    from hf_medvis.models.transfer import build_classifier

    torch.manual_seed(seed)
    model, _ = build_classifier(
        None, spec, preset="tiny", image_size=image_size, patch_size=patch_size, pooling=pooling
    )
    model.save_pretrained(folder)
    build_image_processor(image_size, [0.5] * 3, [0.25] * 3).save_pretrained(folder)
    return folder


def _direct_hirescam(predictor, image: torch.Tensor, class_index: int) -> np.ndarray:
    """HiResCAM (Draelos & Carin 2020) written out: the last block's pre-attention LayerNorm output, CLS left out, times
    the gradient of the class logit element-wise, summed over channels, ReLU, bilinear upsampling, scaled to max 1."""
    from hf_medvis.data.transforms import normalize_batch

    model = predictor.model
    captured = {}
    norm = model.vit.layers[-1].layernorm_before
    handle = norm.register_forward_hook(lambda module, inputs, output: captured.setdefault("tokens", output))
    try:
        pixels = normalize_batch(image[None], predictor.mean, predictor.std, model.config.num_channels)
        with torch.enable_grad():
            logit = model(pixel_values=pixels).logits[0, class_index]
            tokens = captured["tokens"]
            (grad,) = torch.autograd.grad(logit, tokens)
    finally:
        handle.remove()
    side = int(round((tokens.shape[1] - 1) ** 0.5))
    cam = torch.relu((tokens[0, 1:].detach() * grad[0, 1:]).sum(-1)).reshape(side, side)
    size = image.shape[-1]
    cam = torch.nn.functional.interpolate(cam[None, None], size=(size, size), mode="bilinear", align_corners=False)[
        0, 0
    ]
    cam = cam - cam.min()
    return (cam / cam.max() if cam.max() > 0 else cam).numpy()  # all 0: nothing speaks for the class


def test_saliency_maps_match_a_direct_hirescam_per_class(tmp_path, phantom_dir):
    from hf_medvis.evaluation import Predictor

    predictor = Predictor(_save_classifier(tmp_path / "model", MULTI), device="cpu")
    sources = [str(p) for p in sorted((phantom_dir / "images").glob("*.png"))[:3]]
    maps = SaliencyExplainer(predictor).maps(sources, class_indices=[2, 0])
    assert maps.shape == (3, 2, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    for n, source in enumerate(sources):
        image = predictor.preprocess(source)
        for column, class_index in enumerate([2, 0]):
            expected = _direct_hirescam(predictor, image, class_index)
            np.testing.assert_allclose(maps[n, column], expected, atol=2e-3)
    assert not np.allclose(maps[:, 0], maps[:, 1])  # class-specific
    assert all(p.grad is None for p in predictor.model.parameters())  # no gradients left in the model
    assert not predictor.model.training


def _grid_side(config) -> int:
    """The patch grid of the layer the maps read, from the config: ViT family image / patch, Swin halved per stage
    after the first, ConvNeXt's stem stride then halved per stage after the first."""
    stages = len(getattr(config, "depths", [0]))
    return config.image_size // (config.patch_size * 2 ** (stages - 1))


@pytest.mark.parametrize("model_type", ["deit", "beit", "dinov2", "swin", "convnext"])
def test_every_backbone_gets_its_hirescam(tmp_path, phantom_dir, model_type):
    """Each supported backbone, fine-tuned from a checkpoint as the recipe does: its maps are HiResCAM written out on
    the layer heatmaps.target_layer names (the CLS / distillation tokens and the patch grid found from the config)."""
    import transformers
    from test_backbones import CHECKPOINTS

    from hf_medvis.evaluation import Predictor
    from hf_medvis.evaluation.heatmaps import target_layer
    from hf_medvis.models import build_model
    from hf_medvis.models.arguments import ClassifierModelArguments
    from hf_medvis.models.build import build_image_processor

    config, model_class, processor_class = CHECKPOINTS[model_type]
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(tmp_path / "source")
    getattr(transformers, processor_class)().save_pretrained(tmp_path / "source")
    args = ClassifierModelArguments(model_name_or_path=str(tmp_path / "source"))
    build_model(args, task="classification", labels=MULTI).model.save_pretrained(tmp_path / "model")
    build_image_processor(32, [0.5] * 3, [0.25] * 3).save_pretrained(tmp_path / "model")
    predictor = Predictor(tmp_path / "model", device="cpu")
    source = str(sorted((phantom_dir / "images").glob("*.png"))[0])
    maps = SaliencyExplainer(predictor).maps([source])
    assert maps.shape == (1, 3, 32, 32) and maps.max() == 1  # some class has a map to compare

    from hf_medvis.data.transforms import normalize_batch

    model, (layer, _) = predictor.model, target_layer(predictor.model)
    captured = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.setdefault("out", output))
    image = predictor.preprocess(source)
    pixels = normalize_batch(image[None], predictor.mean, predictor.std, model.config.num_channels)
    side = _grid_side(model.config)
    for c in range(3):
        captured.clear()
        with torch.enable_grad():
            logit = model(pixel_values=pixels).logits[0, c]
            (grad,) = torch.autograd.grad(logit, captured["out"])
        out = captured["out"].detach()
        if out.dim() == 3:  # tokens: the last side*side are the patch grid, row by row
            out, grad = (t[0, -side * side :].T.reshape(-1, side, side) for t in (out, grad))
        else:
            out, grad = out[0], grad[0]
        cam = torch.relu((out * grad).sum(0))
        cam = torch.nn.functional.interpolate(cam[None, None], size=(32, 32), mode="bilinear")[0, 0]
        cam = cam - cam.min()
        cam = cam / cam.max() if cam.max() > 0 else cam
        np.testing.assert_allclose(maps[0, c], cam.numpy(), atol=2e-3)
    handle.remove()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pick_examples_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    n, names = 40, ("A", "B", "C")
    probs = np.round(rng.random((n, 3)), 2)  # rounded: ties, which keep the row order
    targets = rng.integers(0, 2, size=(n, 3))
    targets[rng.random((n, 3)) < 0.1] = -1  # unknown labels are no example of anything
    thresholds = [0.5, float("nan"), 0.3]  # NaN: no saved threshold, 0.5
    picked = pick_examples(probs, targets, names, thresholds, k=3)
    for c, name in enumerate(names):
        cut = 0.5 if c == 1 else thresholds[c]
        rows = [(probs[i, c], i, targets[i, c]) for i in range(n)]
        tp = [i for p, i, t in sorted(rows, key=lambda r: (-r[0], r[1])) if t == 1 and p >= cut]
        fp = [i for p, i, t in sorted(rows, key=lambda r: (-r[0], r[1])) if t == 0 and p >= cut]
        fn = [i for p, i, t in sorted(rows, key=lambda r: (r[0], r[1])) if t == 1 and p < cut]
        assert picked[name] == {"true_positive": tp[:3], "false_positive": fp[:3], "false_negative": fn[:3]}
    assert pick_examples(probs, targets, names, {"A": 0.5}) == pick_examples(probs, targets, names, None)
    with pytest.raises(ValueError, match="targets of shape"):
        pick_examples(probs, targets[:, :2], names)


def test_heatmap_file_stems_stay_apart():
    stems = output_stems(["a/x.png", "b/x.png", "c/X.PNG", "x-2.dcm", "s3://bucket/1.2.840.5?version=3", "d/../"])
    assert stems == ["x", "x-2", "X-3", "x-2-2", "1.2.840.5", "image"]


def test_predict_writes_heatmaps_and_lists_them(tmp_path, phantom_dir, capsys):
    from hf_medvis.evaluation import Predictor

    model = _save_classifier(tmp_path / "model", MULTI)
    first, second = sorted((phantom_dir / "images").glob("*.png"))[:2]
    other_folder = tmp_path / "other"
    other_folder.mkdir()
    same_name = shutil.copy(second, other_folder / first.name)  # another image with the first one's file name
    files = [str(first), str(same_name)]
    out = tmp_path / "heat"
    assert cli_main(["predict", "--model", str(model), "--heatmap", str(out), *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stem = first.stem
    expected = [
        {name: str(out / f"{stem}_{name}.png") for name in MULTI.names},
        {name: str(out / f"{stem}-2_{name}.png") for name in MULTI.names},
    ]
    assert [line["heatmaps"] for line in lines] == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(p.rsplit("/", 1)[-1] for e in expected for p in e.values())
    predictor = Predictor(model)
    maps = SaliencyExplainer(predictor).maps(files)
    for n, source in enumerate(files):
        seen = predictor.preprocess(source).numpy()[0]  # the grey image the model saw
        for c, name in enumerate(MULTI.names):
            overlay = np.asarray(Image.open(io.BytesIO(Path(lines[n]["heatmaps"][name]).read_bytes())))
            assert overlay.shape == (32, 32, 3)
            cold = maps[n, c] == 0  # nothing drawn where the map is 0: the image shows through, aligned
            assert cold.any() and (overlay[cold] == seen[cold][:, None]).all()
            assert (overlay[maps[n, c] > 0.5] != seen[maps[n, c] > 0.5][:, None]).any(axis=1).all()


def test_report_examples_are_predicts_heatmaps_of_the_picked_images(tmp_path, phantom_dir):
    """evaluate's report shows, for each pick of pick_examples, the very overlay `predict --heatmap` writes for that
    image and class, captioned with the kind and the image's probability (and no file name)."""
    from hf_medvis.evaluation import Predictor
    from hf_medvis.evaluation.heatmaps import report_examples

    model = _save_classifier(tmp_path / "model", MULTI)
    files = [str(p) for p in sorted((phantom_dir / "images").glob("*.png"))[:8]]
    predictor = Predictor(model)
    probs = predictor.predict(files)
    truth = (np.arange(8)[:, None] + np.arange(3)) % 2  # a mix of positives and negatives per class
    examples = report_examples(predictor, files, probs, truth, thresholds=0.5, k=1)
    picked = pick_examples(probs, truth, MULTI.names, 0.5, k=1)
    expected = [(name, kind, rows[0]) for name in MULTI.names for kind, rows in picked[name].items() if rows]
    assert len(examples) == len(expected) > 0
    out = tmp_path / "heat"
    assert (
        cli_main(["predict", "--model", str(model), "--heatmap", str(out), *files, "--output", str(tmp_path / "o")])
        == 0
    )
    stems = output_stems(files)
    for (caption, png), (name, kind, row) in zip(examples, expected, strict=True):
        assert caption.startswith(f"{name}: {kind.replace('_', ' ')}, p = {probs[row, MULTI.names.index(name)]:.3f}")
        assert Path(files[row]).stem not in caption
        written = np.asarray(Image.open(out / f"{stems[row]}_{name}.png"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), written)


@pytest.fixture(scope="module")
def nodule_finder(tmp_path_factory):
    """A tiny ViT (64 px, patch 8, CLS pooling, as vit_tiny_demo.yaml) trained for 1,500 steps on phantoms rendered in
    pairs, each once with and once without its nodule (the other findings as drawn), so that the nodule is the only
    thing telling the pairs apart: from the plain phantoms the tiny ViT learns Nodule late and erratically (2,400 steps,
    vit_tiny_demo.yaml), far past a test's budget. Trained on Predictor.preprocess's pixels, seeds fixed."""
    import dataclasses

    from hf_medvis.data.phantoms import FINDINGS, plan_phantoms, render_phantom
    from hf_medvis.data.transforms import normalize_batch, to_uint8_tensor
    from hf_medvis.evaluation import Predictor

    folder = _save_classifier(tmp_path_factory.mktemp("nodule_finder"), MULTI, image_size=64, patch_size=8)
    predictor = Predictor(folder, device="cpu")
    plan = plan_phantoms(500, seed=11)
    paired = [
        dataclasses.replace(image, findings=tuple(f for f in FINDINGS if f in image.findings or f == "Nodule"))
        for image in plan
    ] + [dataclasses.replace(image, findings=tuple(f for f in image.findings if f != "Nodule")) for image in plan]
    images = torch.stack([predictor.transform(to_uint8_tensor(render_phantom(image, 64))) for image in paired])
    labels = torch.tensor([[name in image.findings for name in MULTI.names] for image in paired], dtype=torch.float32)
    model, steps = predictor.model.train(), 1500
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(images), generator=generator) for _ in range(steps * 32 // len(images) + 1)])
    for step in range(steps):
        batch = order[step * 32 : (step + 1) * 32]
        pixels = normalize_batch(images[batch], predictor.mean, predictor.std, model.config.num_channels)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(pixel_values=pixels).logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_nodule_map_falls_on_the_drawn_nodule(nodule_finder, tmp_path):
    """On held-out phantoms (other patients, another seed, written at 80 px so that the predictor's resize applies) the
    Nodule map's mass inside the nodule's disc (the generator's own mask, mapped through the predictor's resize and
    centre crop) is many times the disc's share of the image; the other classes' maps put less there."""
    from sklearn.metrics import roc_auc_score

    from hf_medvis.data.phantoms import MASK_CLASSES, phantom_mask, plan_phantoms, write_phantom_dataset
    from hf_medvis.evaluation import Predictor

    predictor = Predictor(nodule_finder, device="cpu")
    folder = write_phantom_dataset(tmp_path / "held_out", patients=80, seed=5, image_size=80, dicom=False)
    plan = plan_phantoms(80, seed=5)
    paths = [str(folder / "images" / image.image_index) for image in plan]
    nodule = MULTI.names.index("Nodule")
    has_nodule = np.array(["Nodule" in image.findings for image in plan])
    probs = predictor.predict(paths)
    auroc = roc_auc_score(has_nodule, probs[:, nodule])
    assert auroc > 0.8  # the model found nodules, else its maps say nothing
    rows = np.flatnonzero(has_nodule)
    maps = SaliencyExplainer(predictor).maps([paths[i] for i in rows])
    ratios = []
    for n, i in enumerate(rows):
        disc = phantom_mask(plan[i], 80) == MASK_CLASSES.index("nodule")
        seen_disc = predictor.transform(torch.from_numpy(disc.astype(np.uint8) * 255)[None])[0].numpy() >= 128
        share = seen_disc.mean()
        ratios.append([maps[n, c][seen_disc].sum() / max(maps[n, c].sum(), 1e-12) / share for c in range(3)])
    ratios = np.array(ratios)
    mean = ratios.mean(axis=0)
    median = np.median(ratios, axis=0)
    print(f"Nodule AUROC {auroc:.3f}; the maps' mass on the disc / its area share over {len(rows)} nodule images: "
          f"mean {dict(zip(MULTI.names, mean.round(2).tolist(), strict=True))}, "
          f"median {dict(zip(MULTI.names, median.round(2).tolist(), strict=True))}")  # fmt: skip
    assert mean[nodule] > 5
    assert mean[nodule] > max(np.delete(mean, nodule))
