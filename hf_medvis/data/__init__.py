"""Data plane: labels files, decoding, phantoms, raw folders, prepared shards and streaming, and the one way the
recipes get their datasets (``build_datasets``). Never imports ``hf_medvis.training`` or ``hf_medvis.models``."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Exports resolve on first use: the `hf-medvis` command imports single light modules of this package.
_EXPORTS = {
    "TASKS": "build",
    "ClassificationDataArguments": "arguments",
    "DataArguments": "arguments",
    "Datasets": "build",
    "ImageDecodeError": "decode",
    "MAEDataArguments": "arguments",
    "SegmentationDataArguments": "arguments",
    "build_datasets": "build",
    "load_image_dataset": "streaming",
    "load_prepared_dataset": "dataset_card",
    "read_image": "decode",
}
__all__ = [
    "ClassificationDataArguments",
    "DataArguments",
    "Datasets",
    "ImageDecodeError",
    "MAEDataArguments",
    "SegmentationDataArguments",
    "TASKS",
    "build_datasets",
    "load_image_dataset",
    "load_prepared_dataset",
    "read_image",
]
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .arguments import ClassificationDataArguments, DataArguments, MAEDataArguments, SegmentationDataArguments
    from .build import TASKS, Datasets, build_datasets
    from .dataset_card import load_prepared_dataset
    from .decode import ImageDecodeError, read_image
    from .streaming import load_image_dataset
