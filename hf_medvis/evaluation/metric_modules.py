"""The metrics as ``evaluate`` modules shipped inside the package, and the calls that go through them.

``evaluate_modules/medvis_<name>/medvis_<name>.py`` (AUROC, average precision, F1, accuracy) load with
``evaluate.load(path)`` from the installed package: no Hub, no network (the Hub's ``evaluate.load("roc_auc")`` fetches
its script at first use, which fails on an offline node). Each returns the per-class and macro values of
``metrics.metric_values`` and, given a patient id per image (``groups``), their 95% CIs from the patient bootstrap
(``bootstrap.py``). The recipes' ``compute_metrics`` and ``metrics_with_ci`` (final metrics, ``hf-medvis evaluate``) call
them through ``evaluate_metrics``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from ..data.labels import LabelSpec
from .metrics import kinds_for, label_targets, ordered, probabilities

if TYPE_CHECKING:
    import evaluate
    from transformers import EvalPrediction

MODULES_DIR = Path(__file__).parent / "evaluate_modules"
# metric family (metrics.KINDS) -> module name, the folder and script name under MODULES_DIR
MODULES = {"auroc": "medvis_auroc", "ap": "medvis_average_precision", "accuracy": "medvis_accuracy", "f1": "medvis_f1"}
_DESCRIPTIONS = {
    "auroc": "One-vs-rest AUROC per class (classes with positives and negatives) and their macro mean: auroc_<class>, "
    "auroc_macro.",
    "ap": "Average precision per class (classes with positives and negatives) and their macro mean: ap_<class>, "
    "ap_macro. Multi-label only.",
    "accuracy": "Accuracy of the most probable class: accuracy. Single-label only.",
    "f1": "Multi-label: F1 per class at `threshold` and their macro mean (f1_<class>, f1_macro); single-label: macro F1 "
    "of the most probable class (f1_macro).",
}
_INPUTS = """
Args:
    predictions: [N, C] probabilities (sigmoid for multi-label, softmax for single-label).
    references: [N, C] 0/1 labels (one-hot for single-label).
    label_names: the C class names (default "0", "1", ...); keys are <metric>_<name>.
    problem_type: "multi_label_classification" (default) or "single_label_classification".
    threshold: probability threshold of multi-label F1 (default 0.5).
    groups: a patient id per image. With them, <key>_ci95_low / <key>_ci95_high: a 95% percentile CI from resampling
        patients (not images) n_resamples times; without them, point estimates only.
    n_resamples: bootstrap resamples (default 1000; 0: no CIs). seed: the bootstrap's seed (default 0).
    per_class: include the per-class values (default True).
Returns: a flat dict of floats, keys as the hf_medvis recipes and `hf-medvis evaluate` write them.
"""


def module_path(name: str) -> str:
    """The folder of a metric module: ``name`` is a family ("auroc", "ap", "accuracy", "f1"), "average_precision", or
    the module name ("medvis_auroc", ...)."""
    kind = {"average_precision": "ap"}.get(name.removeprefix("medvis_"), name.removeprefix("medvis_"))
    if kind not in MODULES:
        raise ValueError(f"unknown metric '{name}' (one of {', '.join(MODULES.values())})")
    return str(MODULES_DIR / MODULES[kind])


def load_metric(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load`` of one of our metric modules (see ``module_path``), offline, data kept in memory."""
    import evaluate  # on use only: see evaluate_metrics

    return evaluate.load(module_path(name), keep_in_memory=True)


@functools.cache
def _loaded(kind: str) -> evaluate.EvaluationModule:
    return load_metric(kind)  # once per process: compute() leaves no state behind


def metric_info(kind: str) -> evaluate.MetricInfo:
    import evaluate  # the module scripts that call this have imported it already

    """The ``_info`` of the module of ``kind``: predictions and references are [N, C] rows."""
    return evaluate.MetricInfo(
        description=_DESCRIPTIONS[kind],
        citation="",
        inputs_description=_INPUTS,
        features=datasets.Features(
            {
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("int32")),
            }
        ),
        reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
    )


def evaluate_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    spec: LabelSpec,
    *,
    threshold: float = 0.5,
    groups: Sequence[Any] | None = None,
    n_resamples: int = 0,
    seed: int = 0,
    ci_kinds: Sequence[str] = (),
    per_class: bool = True,
    via_evaluate: bool = True,
) -> dict[str, float]:
    """``metrics.classification_metrics`` computed by the metric modules, with patient-bootstrap CIs for the families
    in ``ci_kinds`` when ``groups`` are given and ``n_resamples`` > 0.

    ``via_evaluate=False`` runs each module's computation (``bootstrap.compute_for_module``, the same function its
    ``_compute`` calls: identical numbers) without importing ``evaluate``. The training processes use that: importing
    ``evaluate`` loads transformers' pipelines (triton, tokenizers, sympy, ...) into every rank, and 2-rank ZeRO-3 runs
    on CPU then aborted at exit ("terminate called without an active exception") in about 1 run in 4; without the
    import, 0 in 12 (tests/test_multiprocess.py)."""
    labels = np.asarray(labels).astype(np.int32)
    probs = np.asarray(probs, dtype=np.float64)
    ids = None if groups is None else [str(g) for g in groups]
    metrics: dict[str, float] = {}
    from .bootstrap import compute_for_module

    for kind in kinds_for(spec):
        compute = _loaded(kind).compute if via_evaluate else functools.partial(compute_for_module, kind)
        metrics.update(
            compute(
                predictions=probs,
                references=labels,
                label_names=list(spec.names),
                problem_type=spec.problem_type,
                threshold=threshold,
                groups=ids,
                n_resamples=n_resamples if kind in ci_kinds else 0,
                seed=seed,
                per_class=per_class,
            )
        )
    return ordered(metrics, spec.names)


def build_compute_metrics(spec: LabelSpec, threshold: float = 0.5) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for the Trainer: keys become ``eval_auroc_macro``, ``eval_accuracy``, ... (the modules'
    computation, without importing ``evaluate`` into the training processes: see ``evaluate_metrics``)."""

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return evaluate_metrics(
            label_targets(eval_pred.label_ids, spec),
            probabilities(logits, spec),
            spec,
            threshold=threshold,
            via_evaluate=False,
        )

    return compute_metrics
