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
        "and OUT/labels.csv (NIH ChestX-ray14 layout). pathology: OUT/images/*.png as RGB H&E-like tiles with a "
        "learnable 'Tumor' finding, and OUT/labels.csv. The same seed gives byte-identical files.",
    )
    parser.add_argument("--modality", default="chest-xray", choices=("chest-xray", "pathology"), help="which set")
    parser.add_argument("out", help="output folder (must be absent or empty unless --overwrite)")
    parser.add_argument("--patients", type=int, default=200, help="number of patients (default 200, ~2.4 images each)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="square image size in pixels (default 256; pathology 96)"
    )
    parser.add_argument("--no-dicom", action="store_true", help="write PNG only")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .phantoms import plan_phantoms, write_phantom_dataset

    if args.modality == "pathology":
        from .phantoms_pathology import write_pathology_phantoms

        out = write_pathology_phantoms(
            args.out, patients=args.patients, seed=args.seed, image_size=args.image_size or 96, overwrite=args.overwrite
        )
        tiles = len(list((out / "images").glob("*.png")))
        print(f"wrote {tiles} RGB tiles of {args.patients} patients to {out} (images/, labels.csv)")
        return 0
    args.image_size = args.image_size or 256

    out = write_phantom_dataset(
        args.out,
        patients=args.patients,
        seed=args.seed,
        image_size=args.image_size,
        dicom=not args.no_dicom,
        overwrite=args.overwrite,
    )
    plan = plan_phantoms(args.patients, args.seed)
    print(
        f"wrote {len(plan)} images of {args.patients} patients to {out} (images/, {'' if args.no_dicom else 'dicom/, '}labels.csv)"
    )
    return 0
