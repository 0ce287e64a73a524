"""Online linear probe during MAE pretraining (``--probe_labels``): the encoder's features scored by a linear classifier.

The reconstruction loss does not say whether the encoder is getting more useful; a linear probe does. At setup
(``load_probe_set``, before training) a small labelled image set is read with the data wing, decoded and resized as
evaluation does, kept in memory as uint8, and split by patient into probe-train and held-out patients. Every
``--probe_steps`` optimizer steps and at the end of training ``OnlineProbeCallback``:

1. encodes every probe image with the current encoder (``model.vit``, no masking, eval mode, no gradients; the mean of
   the patch tokens of ``last_hidden_state``), then restores the model's modes and config: the weights, the training
   RNG and the loss trajectory are untouched;
2. fits one standardised logistic regression per class (one-vs-rest) on the probe-train patients' features;
3. scores the held-out patients with the scoring function the recipe passes in (the project's one metric
   implementation, ``evaluation.classification_metrics``: training does not import evaluation);
4. logs ``probe_auroc_macro`` and ``probe_auroc_<class>`` through ``Trainer.log`` (trainer_state.json, every
   ``--report_to`` reporter, loss_history.jsonl, the structured logs) and one INFO line with the step and seconds.

Every rank encodes (under DeepSpeed ZeRO-3 each rank must take part in every forward); only the world process zero fits
and logs. The callback holds the Trainer: ``Trainer.log`` is the one call that appends to ``state.log_history`` and
hands the record to every callback's ``on_log``, as ``evaluate()`` does; adding keys to the next training log instead
would only reach the reporters at a logging step, and never after the last one.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...core.storage import describe
from ...core.tasks import MAE
from ...data.folder import build_folder_records, make_decode_transform
from ...data.labels import LabelSpec, encode_labels, infer_label_spec, is_labelled, label_matrix
from ...data.labels.layouts import LabelsFormat
from ...data.privacy import in_holdout
from ...data.transforms import create_transform, normalize_batch
from .common import find_callback
from .preemption import PreemptionCallback

logger = logging.getLogger(__name__)

HOLDOUT_PERCENTAGE = 30.0  # of the probe set's patients, scored; the others fit the classifier
DEFAULT_PROBE_STEPS = 500  # without --probe_steps or --eval_steps
BATCH_SIZE = 64  # images per forward
# The classifier: scikit-learn's LogisticRegression on standardised features, one per class.
PROBE_C = 1.0
PROBE_MAX_ITER = 1000
PROBE_RANDOM_STATE = 0

ScoreFn = Callable[[np.ndarray, np.ndarray, LabelSpec], Mapping[str, float]]


@dataclass
class ProbeSet:
    """The probe's labelled images, decoded once: uint8 [C, S, S] each, with their patient split."""

    images: list[torch.Tensor]
    keys: list[str]
    groups: list[str]  # hashed patient ids
    truth: np.ndarray  # [N, len(spec.names)] 0/1, -1 where unknown
    spec: LabelSpec  # the classes the probe fits: both labels among the probe-train patients
    held_out: np.ndarray  # bool [N]: the patients scored
    skipped_classes: list[str]  # classes of the file without both labels among the probe-train patients
    source: str

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(~self.held_out)

    @property
    def held_out_index(self) -> np.ndarray:
        return np.flatnonzero(self.held_out)


def select_by_patient(groups: Sequence[str], keys: Sequence[str], max_images: int) -> list[int]:
    """Indices of at most ``max_images`` images, whole patients taken in the order of their hashed id (deterministic,
    and unrelated to file order); sorted by key within a patient. The first patient alone may be cut to the cap."""
    by_patient: dict[str, list[int]] = {}
    for index in sorted(range(len(groups)), key=lambda i: (groups[i], keys[i])):
        by_patient.setdefault(groups[index], []).append(index)
    chosen: list[int] = []
    for indices in by_patient.values():
        if chosen and len(chosen) + len(indices) > max_images:
            break
        chosen.extend(indices[: max_images - len(chosen)])
        if len(chosen) >= max_images:
            break
    return chosen


def decode_images(
    paths: Sequence[str], keys: Sequence[str], image_size: int, storage_options: dict | None = None
) -> list[torch.Tensor]:
    """uint8 [C, image_size, image_size] per file: the folder dataset's decode (``make_decode_transform``) with the
    evaluation transform (shorter side to ``image_size``, bicubic, centre crop), on a few threads."""
    transform = create_transform(MAE, False, image_size=image_size)
    chunks = [range(start, min(start + BATCH_SIZE, len(paths))) for start in range(0, len(paths), BATCH_SIZE)]

    def decode(chunk: range) -> list[torch.Tensor]:
        # A transform per chunk: its cache of full-size decoded images lives only as long as the chunk.
        decoder = make_decode_transform(transform, storage_options)
        return decoder({"path": [paths[i] for i in chunk], "key": [keys[i] for i in chunk]})["pixel_values"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [image for images in pool.map(decode, chunks) for image in images]


def load_probe_set(
    images: str,
    labels_file: str,
    *,
    image_size: int,
    max_images: int = 2000,
    storage_options: dict | None = None,
    labels_format: LabelsFormat | None = None,
    holdout_percentage: float = HOLDOUT_PERCENTAGE,
) -> ProbeSet:
    """The labelled images of ``images`` that ``labels_file`` lists, capped by patient, decoded now; ValueError (one
    line) for a file that labels none of them, a split with no patient on one side, or no class to fit or score."""
    where = f"--probe_labels {labels_file}"
    records = build_folder_records(images, labels_file, storage_options, labels_format or LabelsFormat())
    labelled = [i for i, text in enumerate(records["finding_labels"]) if is_labelled(text)]
    if not labelled:
        raise ValueError(f"{where}: none of the {len(records['path'])} images in {describe(images)} has a label in it")
    keep = [labelled[i] for i in select_by_patient(
        [records["group"][i] for i in labelled], [records["key"][i] for i in labelled], max_images
    )]  # fmt: skip
    paths = [records["path"][i] for i in keep]
    keys = [records["key"][i] for i in keep]
    groups = [records["group"][i] for i in keep]
    texts = [records["finding_labels"][i] for i in keep]
    full_spec = infer_label_spec(texts)
    truth = label_matrix(encode_labels(texts, full_spec), full_spec)
    held_out = np.array([in_holdout(group, holdout_percentage) for group in groups], dtype=bool)
    patients = len(set(groups))
    held_patients = len({g for g, h in zip(groups, held_out, strict=True) if h})
    if held_patients == 0 or held_patients == patients:
        side = "held out" if held_patients == 0 else "left to fit on"
        raise ValueError(
            f"{where}: none of its {patients} patient(s) is {side} ({holdout_percentage:g}% are held out by patient); "
            "label images of more patients"
        )

    def has_both(rows: np.ndarray, column: int) -> bool:
        values = truth[rows, column]
        return bool((values == 1).any() and (values == 0).any())

    train_rows, held_rows = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    fitted = [c for c in range(len(full_spec.names)) if has_both(train_rows, c)]
    skipped = [full_spec.names[c] for c in range(len(full_spec.names)) if c not in fitted]
    if not any(has_both(held_rows, c) for c in fitted):
        raise ValueError(
            f"{where}: no class has both positive and negative images among the probe-train patients and among the "
            f"held-out patients ({', '.join(full_spec.names)}): probe_auroc_macro would be undefined"
        )
    spec = LabelSpec(tuple(full_spec.names[c] for c in fitted), full_spec.problem_type)
    started = time.perf_counter()
    decoded = decode_images(paths, keys, image_size, storage_options)
    logger.info(
        "online probe: %d images of %d patients from %s (%d of them held out: %d images), %d classes (%s), decoded "
        "in %.1f s%s",
        len(keep),
        patients,
        describe(images),
        held_patients,
        len(held_rows),
        len(spec.names),
        ", ".join(spec.names),
        time.perf_counter() - started,
        f"; not probed, without both labels among the probe-train patients: {', '.join(skipped)}" if skipped else "",
    )
    return ProbeSet(
        images=decoded,
        keys=keys,
        groups=groups,
        truth=truth[:, fitted],
        spec=spec,
        held_out=held_out,
        skipped_classes=skipped,
        source=str(images),
    )


def _unmasked_vit(model: torch.nn.Module) -> torch.nn.Module:
    encoder = getattr(model, "vit", None)
    if encoder is None:
        raise TypeError(f"the online probe needs a ViT-MAE model (with .vit), got {type(model).__name__}")
    return encoder


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """[N, hidden] float32: the mean patch token of ``model.vit``'s ``last_hidden_state``, every patch kept.

    ViTMAEModel always masks (transformers 5: ``random_masking`` with ``config.mask_ratio``); with the ratio at 0 and
    ``noise`` rising along the sequence every patch is kept in its own order and no random number is drawn. The
    encoder runs in eval mode; its modules' modes and the config's ratio are restored afterwards, and the RNG state is
    forked so that nothing here can change the training run's random draws."""
    encoder = _unmasked_vit(model)
    configs = {id(c): c for c in (model.config, encoder.config, getattr(encoder.embeddings, "config", encoder.config))}
    ratios = {key: config.mask_ratio for key, config in configs.items()}
    modes = [(module, module.training) for module in encoder.modules()]
    device = torch.device(device)
    dtype = next(encoder.parameters()).dtype  # bf16 under DeepSpeed; the probe runs outside autocast
    num_channels = model.config.num_channels
    features = []
    try:
        for config in configs.values():
            config.mask_ratio = 0.0
        encoder.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                if len({tuple(image.shape) for image in chunk}) == 1:
                    pixels = normalize_batch(torch.stack(chunk).to(device), mean, std, num_channels)
                else:  # grey and colour files mixed: each replicated to the model's channels
                    pixels = torch.cat(
                        [normalize_batch(image[None].to(device), mean, std, num_channels) for image in chunk]
                    )
                patches = encoder.embeddings.patch_embeddings.num_patches
                noise = torch.arange(patches, device=device, dtype=torch.float32).expand(len(chunk), patches)
                hidden = encoder(pixel_values=pixels.to(dtype), noise=noise).last_hidden_state
                features.append(hidden[:, 1:, :].float().mean(dim=1).cpu())
    finally:
        for key, config in configs.items():
            config.mask_ratio = ratios[key]
        for module, training in modes:
            module.training = training
    return torch.cat(features).numpy()


def fit_and_predict(features: np.ndarray, truth: np.ndarray, train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """[len(held_out), C] probabilities: per class a LogisticRegression on the standardised features of the ``train``
    rows whose label is known."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features[train])
    x_train, x_held = scaler.transform(features[train]), scaler.transform(features[held_out])
    probs = np.zeros((len(held_out), truth.shape[1]), dtype=np.float64)
    for column in range(truth.shape[1]):
        known = truth[train, column] >= 0
        classifier = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=PROBE_RANDOM_STATE)
        with warnings.catch_warnings():  # a probe of a barely trained encoder may not converge; it still scores
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(x_train[known], truth[train, column][known].astype(int))
        probs[:, column] = classifier.predict_proba(x_held)[:, 1]
    return probs


class OnlineProbeCallback(TrainerCallback):
    """Every ``probe_steps`` optimizer steps (default: ``--eval_steps``, else 500) and at the end of training: the
    online probe (module docstring), logged as ``probe_auroc_macro`` and ``probe_auroc_<class>`` at that step."""

    def __init__(self, trainer: Any, probe_set: ProbeSet, score: ScoreFn, probe_steps: int | None = None) -> None:
        """``trainer``: the MedVisTrainer it logs through (and whose ``image_mean``/``image_std`` it normalises with);
        ``score(labels, probs, spec)``: the metric implementation, returning ``auroc_<class>`` and ``auroc_macro``."""
        self.trainer = trainer
        self.probe_set = probe_set
        self.score = score
        self.probe_steps = probe_steps
        self.every = probe_steps or DEFAULT_PROBE_STEPS
        self.last_step: int | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer's own eval interval: TrainerState.compute_steps has already turned a ratio into steps.
        self.every = self.probe_steps or state.eval_steps or DEFAULT_PROBE_STEPS

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        step = state.global_step
        if (step % self.every == 0 or step >= state.max_steps) and not self._preempted():
            self.probe(args, state, model, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        # Stopped early (alert, early stopping): the last step is probed too; a preempted run leaves it to its resume.
        if self.last_step != state.global_step and state.global_step > 0 and not self._preempted():
            self.probe(args, state, model)

    def _preempted(self) -> bool:
        callback = find_callback(self.trainer, PreemptionCallback)
        return callback is not None and callback.stopped_at is not None

    def measure(self, model: torch.nn.Module, device: torch.device | str, fit: bool = True) -> dict[str, float]:
        """Encodes the probe set; with ``fit`` (the world process zero), fits on the probe-train patients and returns
        the held-out scores as ``probe_auroc_*`` metrics. Leaves the model as it found it."""
        probe = self.probe_set
        features = encode_images(model, probe.images, self.trainer.image_mean, self.trainer.image_std, device)
        if not fit:
            return {}
        train, held = probe.train_index, probe.held_out_index
        probs = fit_and_predict(features, probe.truth, train, held)
        scores = self.score(probe.truth[held], probs, probe.spec)
        return {f"probe_{key}": float(value) for key, value in scores.items() if key.startswith("auroc_")}

    def probe(
        self, args: TrainingArguments, state: TrainerState, model: Any = None, control: TrainerControl | None = None
    ) -> dict[str, float]:
        model = model if model is not None else self.trainer.model
        self.last_step = state.global_step
        started = time.perf_counter()
        metrics = self.measure(model, args.device, fit=state.is_world_process_zero)
        if not state.is_world_process_zero:
            return metrics
        seconds = time.perf_counter() - started
        metrics["probe_seconds"] = round(seconds, 3)
        # The callback handler's on_log clears should_log: a probe step that is also a logging step (set by the flow
        # callback before us) must still log its training loss.
        should_log = control.should_log if control is not None else False
        self.trainer.log(dict(metrics))
        if control is not None:
            control.should_log = should_log
        logger.info(
            "online probe at step %d: probe_auroc_macro %s, %.1f s",
            state.global_step,
            f"{metrics['probe_auroc_macro']:.4f}" if "probe_auroc_macro" in metrics else "undefined",
            seconds,
            extra={"step": state.global_step},
        )
        return metrics


__all__ = [
    "OnlineProbeCallback",
    "ProbeSet",
    "decode_images",
    "encode_images",
    "fit_and_predict",
    "load_probe_set",
    "select_by_patient",
]
