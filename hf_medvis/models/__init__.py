"""Models: the one way the recipes build theirs (``build_model``), from a preset, a Hub id or a local folder, and the
pieces behind it (MAE factory, MAE→ViT transfer, saved-weight loading, optimizer parameter groups, imports of public
checkpoints). Imports nothing from ``hf_medvis.data`` or ``hf_medvis.training``."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from ..core.param_count import count_parameters
from ..core.tasks import TASKS

# Exports resolve on first use: `hf-medvis --help` imports models.import_cli without torch or transformers.
_EXPORTS = {
    "BuiltModel": "factory",
    "ClassifierModelArguments": "arguments",
    "LoadReport": "transfer",
    "MAEModelArguments": "arguments",
    "ModelArguments": "arguments",
    "add_drop_path": "drop_path",
    "build_image_processor": "build",
    "build_model": "factory",
    "input_image_size": "factory",
    "load_classifier": "transfer",
    "load_config": "transfer",
    "resolve_normalization": "build",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "TASKS",
    "BuiltModel",
    "ClassifierModelArguments",
    "LoadReport",
    "MAEModelArguments",
    "ModelArguments",
    "add_drop_path",
    "build_image_processor",
    "build_model",
    "count_parameters",
    "input_image_size",
    "load_classifier",
    "load_config",
    "resolve_normalization",
]

if TYPE_CHECKING:
    from .arguments import ClassifierModelArguments, MAEModelArguments, ModelArguments
    from .build import build_image_processor, resolve_normalization
    from .drop_path import add_drop_path
    from .factory import BuiltModel, build_model, input_image_size
    from .transfer import LoadReport, load_classifier, load_config
