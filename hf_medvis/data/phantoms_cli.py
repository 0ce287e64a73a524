"""``hf-medvis demo-data OUT``: writes the synthetic chest X-ray phantom set."""

from __future__ import annotations

import argparse

# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="write a deterministic synthetic phantom set (chest X-ray PNG + DICOM, or colour pathology tiles)",
        description="chest-xray (default): writes OUT/images/*.png (8-bit), OUT/dicom/*.dcm (16-bit, MONOCHROME1/2) "
        "and OUT/labels.csv (NIH ChestX-ray14 layout). --version 3 (default): non-square images, subtle findings, "
        "AP views noisier with a magnified heart, a Site column whose site B renders brighter, 12/14/16-bit DICOMs and "
        "label noise in labels.csv (the drawn findings in OUT/labels_truth.csv); --version 2: the square, clean set the "
        "recipes use by default. pathology: OUT/images/*.png as RGB H&E-like tiles with a "
        "learnable 'Tumor' finding, and OUT/labels.csv. The same seed gives byte-identical files. --masks (chest-xray): "
        "also OUT/masks/<stem>.png (class indices: 0 background, 1 lung, 2 heart, 3 nodule) and OUT/masks/classes.json, "
        "the segmentation layout --masks_dir reads.",
    )
    parser.add_argument("--modality", default="chest-xray", choices=("chest-xray", "pathology"), help="which set")
    parser.add_argument("out", help="output folder (must be absent or empty unless --overwrite)")
    parser.add_argument("--patients", type=int, default=200, help="number of patients (default 200, ~2.4 images each)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image size in pixels (default 256; pathology 96): v2 square, v3 the shorter side",
    )
    parser.add_argument(
        "--version",
        type=int,
        default=None,
        choices=(2, 3),
        help="chest-xray phantom version (default 3, the demo's: realistic effects and label noise; 2: square, clean)",
    )
    parser.add_argument("--no-dicom", action="store_true", help="write PNG only")
    parser.add_argument(
        "--masks",
        action="store_true",
        help="chest-xray: also write segmentation masks (lung, heart, nodule) in OUT/masks/",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .phantoms import DEMO_PHANTOM_VERSION, TRUTH_LABELS_FILE, plan_phantoms, write_phantom_dataset

    if args.modality == "pathology":
        if args.version is not None:
            raise ValueError("--version is for --modality chest-xray (the pathology tiles have one version)")
        if args.masks:
            raise ValueError("--masks is for --modality chest-xray (the pathology tiles have no masks)")
        from .phantoms_pathology import write_pathology_phantoms

        out = write_pathology_phantoms(
            args.out, patients=args.patients, seed=args.seed, image_size=args.image_size or 96, overwrite=args.overwrite
        )
        tiles = len(list((out / "images").glob("*.png")))
        print(f"wrote {tiles} RGB tiles of {args.patients} patients to {out} (images/, labels.csv)")
        return 0
    args.image_size = args.image_size or 256
    version = args.version or DEMO_PHANTOM_VERSION

    out = write_phantom_dataset(
        args.out,
        patients=args.patients,
        seed=args.seed,
        image_size=args.image_size,
        dicom=not args.no_dicom,
        overwrite=args.overwrite,
        masks=args.masks,
        version=version,
    )
    plan = plan_phantoms(args.patients, args.seed, version)
    folders = "images/, " + ("" if args.no_dicom else "dicom/, ") + ("masks/, " if args.masks else "")
    tables = "labels.csv" + (f", {TRUTH_LABELS_FILE}" if version >= 3 else "")
    print(f"wrote {len(plan)} v{version} phantom images of {args.patients} patients to {out} ({folders}{tables})")
    return 0
