"""``evaluate`` module medvis_average_precision: average precision per class and macro, with patient-bootstrap 95% CIs (see metric_modules.py)."""

from typing import Any

import evaluate

from hf_medvis.evaluation.bootstrap import compute_for_module
from hf_medvis.evaluation.metric_modules import metric_info

# evaluate.load takes the first EvaluationModule subclass of this file as the module: import no class here.


class MedvisAveragePrecision(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info("ap")

    def _compute(self, predictions: Any, references: Any, **kwargs: Any) -> dict[str, float]:
        return compute_for_module("ap", predictions, references, **kwargs)
