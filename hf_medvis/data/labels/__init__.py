"""Labels: finding-label strings (``findings``), labels CSV files (``table``) and their layouts (``layouts``: NIH,
CheXpert-style wide files). The public names of the three modules are importable from here."""

from typing import TYPE_CHECKING

from ..._lazy import lazy_exports

# Exports resolve on first use: the `hf-medvis` command imports ``layouts`` for its flags, and must not load numpy.
_EXPORTS = {
    "MULTI_LABEL": "findings",
    "SEPARATOR": "findings",
    "SINGLE_LABEL": "findings",
    "LabelError": "findings",
    "LabelSpec": "findings",
    "check_file_classes": "findings",
    "encode_labels": "findings",
    "infer_label_spec": "findings",
    "is_labelled": "findings",
    "label_matrix": "findings",
    "parse_finding_labels": "findings",
    "parse_unknown_labels": "findings",
    "positive_weights": "findings",
    "IMAGE_COL": "layouts",
    "LABEL_COL": "layouts",
    "NO_FINDING": "layouts",
    "PATIENT_COL": "layouts",
    "UNKNOWN_PREFIX": "layouts",
    "VIEW_COL": "layouts",
    "LabelFormatError": "layouts",
    "LabelsFormat": "layouts",
    "IMAGE_EXTENSIONS": "table",
    "LabelsTable": "table",
    "normalize_patient_id": "table",
    "read_labels_table": "table",
    "sample_key": "table",
    "strip_image_extension": "table",
}
__all__ = [
    "MULTI_LABEL",
    "SEPARATOR",
    "SINGLE_LABEL",
    "LabelError",
    "LabelSpec",
    "check_file_classes",
    "encode_labels",
    "infer_label_spec",
    "is_labelled",
    "label_matrix",
    "parse_finding_labels",
    "parse_unknown_labels",
    "positive_weights",
    "IMAGE_COL",
    "LABEL_COL",
    "NO_FINDING",
    "PATIENT_COL",
    "UNKNOWN_PREFIX",
    "VIEW_COL",
    "LabelFormatError",
    "LabelsFormat",
    "IMAGE_EXTENSIONS",
    "LabelsTable",
    "normalize_patient_id",
    "read_labels_table",
    "sample_key",
    "strip_image_extension",
]
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .findings import (
        MULTI_LABEL,
        SEPARATOR,
        SINGLE_LABEL,
        LabelError,
        LabelSpec,
        check_file_classes,
        encode_labels,
        infer_label_spec,
        is_labelled,
        label_matrix,
        parse_finding_labels,
        parse_unknown_labels,
        positive_weights,
    )
    from .layouts import (
        IMAGE_COL,
        LABEL_COL,
        NO_FINDING,
        PATIENT_COL,
        UNKNOWN_PREFIX,
        VIEW_COL,
        LabelFormatError,
        LabelsFormat,
    )
    from .table import (
        IMAGE_EXTENSIONS,
        LabelsTable,
        normalize_patient_id,
        read_labels_table,
        sample_key,
        strip_image_extension,
    )
