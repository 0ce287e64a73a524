"""The recipes' data arguments (HfArgumentParser dataclasses): where the images and labels are and how they are
augmented. ``build_datasets`` takes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.storage import parse_storage_options
from .hf_inputs import hf_dataset_kind
from .labels.layouts import DEPRECATED_COLUMN_FLAGS, LABEL_COL, LabelsFormat, column_flag
from .shard_format import MANIFEST_NAME


@dataclass
class DataArguments:
    """Where the images are. Without ``--train_data`` the embedded phantom chest X-ray set is used."""

    train_data: str | None = field(
        default=None,
        metadata={
            "help": "Training images: a folder, glob or fsspec URL (az://, abfs://, file://) of PNG/JPEG/DICOM files, "
            "or a prepared-shard location. Default: the embedded synthetic chest X-ray phantoms."
        },
    )
    validation_data: str | None = field(
        default=None,
        metadata={"help": "Held-out images (same forms). Default: a patient-level holdout of --train_data."},
    )
    labels_file: str | None = field(
        default=None,
        metadata={
            "help": "NIH-style labels CSV (Image Index, Patient ID, Finding Labels, ...). "
            "Default: labels.csv beside the images, if any."
        },
    )
    labels_format: str = field(
        default="nih",
        metadata={
            "help": "Labels file layout: nih, wide (CheXpert/MIMIC: one column per class, 1/0/-1/blank or YES/NO), "
            "list (PadChest: list text), long (VinDr: one row per finding, box or reader) or auto."
        },
    )
    image_col: str | None = field(default=None, metadata={"help": "Deprecated spelling of --image_column_name."})
    group_col: str | None = field(default=None, metadata={"help": "Deprecated spelling of --group_column_name."})
    patient_regex: str | None = field(
        default=None, metadata={"help": "Patient from the image path instead: first group, e.g. 'patient(\\d+)'."}
    )
    uncertain: str = field(
        default="ignore",
        metadata={"help": "Wide layout, -1: ignore (masked out of loss and metrics), zeros or ones (CheXpert U-*)."},
    )
    blank: str = field(default="negative", metadata={"help": "Wide layout, an empty cell: negative or ignore."})
    reader_col: str | None = field(
        default=None, metadata={"help": "Long layout: the reader of each row (VinDr: rad_id)."}
    )
    readers: str = field(
        default="majority",
        metadata={"help": "Long layout with --reader_col: a finding counts when more than half of the image's readers "
                  "name it (majority) or any does (any)."},
    )  # fmt: skip
    duplicates: str = field(
        default="error",
        metadata={"help": "Several rows of one image: error, or merge (a class is positive when any row says so)."},
    )
    negative_label: str = field(
        default="No Finding",
        metadata={"help": "The finding that means none of the classes (PadChest: normal); case-insensitive."},
    )
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Image column: of the labels file (default 'Image Index'; wide: 'Path'), or of a datasets "
                  "folder / imagefolder / Hub id --train_data (default: the first Image column)."},
    )  # fmt: skip
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Findings column: of the labels file (nih, list, long; default 'Finding Labels'), or of a "
                  "datasets --train_data (ClassLabel, list of ClassLabel or text; default 'label')."},
    )  # fmt: skip
    group_column_name: str | None = field(
        default=None,
        metadata={"help": "Patient column: of the labels file (default 'Patient ID'), or of a datasets --train_data "
                  "(default: none, every image its own patient)."},
    )  # fmt: skip
    storage_options: str | None = field(
        default=None, metadata={"help": "JSON dict of fsspec storage options (credentials are never logged)."}
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of patients held out when --validation_data is not given."}
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Normalisation mean (1 value or one per channel). Default: the checkpoint's, else X-ray statistics."
        },
    )
    image_std: list[float] | None = field(default=None, metadata={"help": "Normalisation std (see --image_mean)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    phantom_patients: int = field(default=200, metadata={"help": "Patients in the embedded phantom set."})

    def parsed_labels_format(self) -> LabelsFormat:
        return LabelsFormat(
            layout=self.labels_format,
            image_col=self.image_column_name,
            group_col=self.group_column_name,
            label_col=self.label_column_name or LABEL_COL,
            patient_regex=self.patient_regex,
            uncertain=self.uncertain,
            blank=self.blank,
            reader_col=self.reader_col,
            readers=self.readers,
            duplicates=self.duplicates,
            negative_label=self.negative_label,
        )

    def __post_init__(self) -> None:
        for new, old in DEPRECATED_COLUMN_FLAGS.items():  # the old spelling sets the new field, once
            value = column_flag(getattr(self, new), getattr(self, old), f"--{new}", f"--{old}")
            setattr(self, new, value)
            setattr(self, old, None)
        self.parsed_labels_format()  # checks the choices
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}"
            )
        try:  # parsed once, here: parsed_storage_options hands out this dict
            self._storage_options_parsed = (self.storage_options, parse_storage_options(self.storage_options) or None)
        except ValueError:  # never echo the value: it usually holds credentials
            raise ValueError("--storage_options must be a JSON object (value not shown)") from None
        if self.phantom_patients < 2:
            raise ValueError(f"--phantom_patients must be >= 2, got {self.phantom_patients}")

    def parsed_storage_options(self) -> dict | None:
        """``--storage_options`` as a dict (None without any): parsed once, again only if the text was changed since."""
        text, parsed = getattr(self, "_storage_options_parsed", (None, None))
        if text != self.storage_options:
            parsed = parse_storage_options(self.storage_options) or None
            self._storage_options_parsed = (self.storage_options, parsed)
        return dict(parsed) if parsed else None  # a copy: a caller's change never reaches the next caller


@dataclass
class MAEDataArguments(DataArguments):
    crop_scale: list[float] = field(
        default_factory=lambda: [0.2, 1.0],
        metadata={"help": "RandomResizedCrop scale range (MAE: 0.2 1.0; X-ray MAE: 0.5 1.0)."},
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips during pretraining."})
    num_reconstruction_images: int = field(
        default=8, metadata={"help": "Held-out images shown in reconstructions.png (0 to skip)."}
    )
    augment_on_device: bool = field(
        default=False,
        metadata={
            "help": "Crop and flip on the accelerator (one grid_sample per batch); loader workers only hand over "
            "fixed-size uint8 images. For GPU hosts whose CPU workers cannot keep up."
        },
    )
    probe_labels: str | None = field(
        default=None,
        metadata={"help": "Online linear probe: a labels CSV (NIH layout, or the --labels_format flags') of a small "
                  "labelled image set. Every --probe_steps steps and at the end, a logistic regression on the "
                  "encoder's mean patch token is fitted on 70%% of its patients and scored on the other 30%%: logged "
                  "as probe_auroc_macro and probe_auroc_<class>."},
    )  # fmt: skip
    probe_data: str | None = field(
        default=None,
        metadata={"help": "The probe's images: folder, glob or fsspec URL. Default: --train_data when that is a "
                  "local image folder (required otherwise)."},
    )  # fmt: skip
    probe_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps between probes (default: --eval_steps, else 500)."}
    )
    probe_max_images: int = field(
        default=2000,
        metadata={"help": "At most this many probe images, whole patients chosen by hashed patient id; decoded once "
                  "and kept in memory (uint8) on every process."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop_scale needs two values 0 < min <= max <= 1, got {self.crop_scale}")
        self._check_probe()

    def _check_probe(self) -> None:
        if self.probe_labels is None:
            for name in ("probe_data", "probe_steps"):
                if getattr(self, name) is not None:
                    raise ValueError(f"--{name} needs --probe_labels (the labels of the online probe's images)")
            return
        if self.probe_steps is not None and self.probe_steps < 1:
            raise ValueError(f"--probe_steps must be >= 1, got {self.probe_steps}")
        if self.probe_max_images < 2:
            raise ValueError(f"--probe_max_images must be >= 2, got {self.probe_max_images}")
        if self.probe_data is None:
            if not _local_image_folder(self.train_data):
                given = f"--train_data {self.train_data}" if self.train_data else "the embedded phantom set"
                raise ValueError(
                    f"--probe_labels needs --probe_data IMAGES: the probe's images default to --train_data only when "
                    f"that is a local image folder, not {given}"
                )
            self.probe_data = self.train_data


def _local_image_folder(location: str | None) -> bool:
    """A folder of image files on this machine: not prepared shards, not a ``datasets`` input."""
    if not location:
        return False
    path = Path(location).expanduser()
    return path.is_dir() and hf_dataset_kind(location) is None and not (path / MANIFEST_NAME).is_file()


@dataclass
class SupervisedDataArguments(DataArguments):
    """The fields both fine-tuning tasks share (classification, segmentation): the validation labels, the geometric
    augmentation and what the model card records."""

    validation_labels_file: str | None = field(
        default=None,
        metadata={
            "help": "Labels CSV of --validation_data (e.g. val.csv of `hf-medvis split`). Images "
            "not listed in an explicit labels file are skipped."
        },
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.8, 1.0], metadata={"help": "RandomResizedCrop scale range (aspect ratio 0.9-1.1)."}
    )
    rotation_degrees: float = field(default=5.0, metadata={"help": "Random rotation range (degrees); 0 disables."})
    hflip: bool = field(
        default=False,
        metadata={"help": "Random horizontal flips. Off by default: chest X-rays are not left-right symmetric "
                  "(heart on the patient's left; laterality of findings matters)."},
    )  # fmt: skip
    phantom_image_size: int = field(
        default=256, metadata={"help": "Pixel size of the embedded phantom images (smaller decodes faster on CPU)."}
    )
    dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset id of the training data, recorded in the model card's metadata."}
    )
    ci_bootstrap_samples: int = field(
        default=200, metadata={"help": "Patient-level bootstrap resamples for the final metrics' 95%% CIs (0: none)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop_scale needs two values 0 < min <= max <= 1, got {self.crop_scale}")


@dataclass
class ClassificationDataArguments(SupervisedDataArguments):
    problem_type: str = field(
        default="auto",
        metadata={"help": "multi_label (BCE; 'A|B', 'No Finding' = all negative), single_label (softmax over "
                  "classes) or auto (multi-label if any image has 0 or several findings)."},
    )  # fmt: skip
    pos_weight: bool = field(
        default=False, metadata={"help": "Multi-label: weight positives by negatives/positives of the training set."}
    )
    threshold: float = field(default=0.5, metadata={"help": "Probability threshold for F1 (multi-label)."})
    rand_augment_magnitude: int = field(
        default=0, metadata={"help": "RandAugment magnitude (2 ops); 0 disables (X-ray MAE recipe: 6)."}
    )
    eval_subsample: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate during training on a fixed label-stratified subsample of this many "
            "validation images (the final evaluation uses all of them)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold < 1:
            raise ValueError(f"--threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.rand_augment_magnitude <= 30:
            raise ValueError(f"--rand_augment_magnitude must be in [0, 30], got {self.rand_augment_magnitude}")
        if self.problem_type not in ("auto", "multi_label", "single_label"):
            raise ValueError(f"--problem_type must be auto, multi_label or single_label, got '{self.problem_type}'")


@dataclass
class SegmentationDataArguments(SupervisedDataArguments):
    """Images with one mask each: a folder of PNG class-index masks (``--masks_dir``) or an RLE CSV (``--masks_rle``).
    Without ``--train_data``: the embedded phantoms with their lung, heart and nodule masks."""

    masks_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of masks: one PNG of class indices per image, the image's stem and size (255 = "
                  "unlabelled, ignored), with classes.json (the class names, index = position) unless --mask_labels."},
    )  # fmt: skip
    masks_rle: str | None = field(
        default=None,
        metadata={"help": "CSV of run-length encoded masks in the SIIM-ACR pneumothorax layout: ImageId (the image's "
                  "stem), EncodedPixels (column-major relative start/length pairs; -1 = empty; several rows of one "
                  "image are united). One foreground class."},
    )  # fmt: skip
    mask_labels: str | None = field(
        default=None,
        metadata={"help": "Class names, comma-separated, index = position, 0 = background (e.g. "
                  "background,lung,heart,nodule). Default: classes.json in --masks_dir; RLE: background,foreground."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.masks_dir is not None and self.masks_rle is not None:
            raise ValueError("give --masks_dir or --masks_rle, not both")
        # --train_data without --masks_dir / --masks_rle: prepared shards carry their masks (checked in masks.py).
        if self.train_data is None and (self.masks_dir is not None or self.masks_rle is not None):
            raise ValueError("--masks_dir / --masks_rle need --train_data (the phantoms bring their own masks)")
