"""The metrics as ``evaluate`` modules shipped inside the package: the public interface for code outside hf_medvis.

``evaluate_modules/medvis_<name>/medvis_<name>.py`` (AUROC, average precision, F1, accuracy) load with
``evaluate.load(path)`` from the installed package: no Hub, no network (the Hub's ``evaluate.load("roc_auc")`` fetches
its script at first use, which fails on an offline node). Each ``_compute`` is ``bootstrap.compute_for_module``: the
per-class and macro values of ``metrics.metric_values`` and, given a patient id per image (``groups``), their 95% CIs
from the patient bootstrap. hf_medvis itself calls that computation directly (``metrics.build_compute_metrics``,
``bootstrap.metrics_with_ci``), never through ``evaluate``: importing ``evaluate`` loads transformers' pipelines
(triton, tokenizers, sympy, ...) into every training rank, and 2-rank ZeRO-3 runs on CPU then aborted at exit
("terminate called without an active exception") in about 1 run in 4; without the import, 0 in 12.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import datasets

if TYPE_CHECKING:
    import evaluate

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
    references: [N, C] 0/1 labels (one-hot for single-label); -1: unknown, left out of that class's metrics.
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
    import evaluate  # on use only: never in the training processes (see above)

    return evaluate.load(module_path(name), keep_in_memory=True)


def metric_info(kind: str) -> evaluate.MetricInfo:
    """The ``_info`` of the module of ``kind``: predictions and references are [N, C] rows."""
    import evaluate  # the module scripts that call this have imported it already

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
