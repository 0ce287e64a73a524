"""``hf-medvis demo-data OUT``: writes the synthetic chest X-ray phantom set."""

from __future__ import annotations

import argparse

# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="write the deterministic synthetic chest X-ray phantom set (PNG + DICOM + labels.csv)",
        description="Writes OUT/images/*.png (8-bit), OUT/dicom/*.dcm (16-bit, MONOCHROME1/2) and OUT/labels.csv "
        "(NIH ChestX-ray14 layout). The same seed gives byte-identical files.",
    )
    parser.add_argument("out", help="output folder (must be absent or empty unless --overwrite)")
    parser.add_argument("--patients", type=int, default=200, help="number of patients (default 200, ~2.4 images each)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=256, help="square image size in pixels (default 256)")
    parser.add_argument("--no-dicom", action="store_true", help="write PNG only")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .phantoms import plan_phantoms, write_phantom_dataset

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
