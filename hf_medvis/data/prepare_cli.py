"""``hf-medvis prepare SRC DST``: raw images -> pre-sized Parquet shards + manifest + quarantine report."""

from __future__ import annotations

import argparse
import sys

from .labels.layouts import add_labels_format_arguments, labels_format_from_args

# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="decode raw images once into pre-sized grayscale shards for fast streaming",
        description="Decodes every image under SRC (folder, glob or fsspec URL such as az://container/raw) with "
        "read_image, resizes it (shorter side to --size, centre crop), and writes Parquet shards, manifest.json and "
        "quarantine.jsonl under DST (folder or fsspec URL). Re-running skips finished shards; DST holds one dataset "
        "(another source's is refused unless --overwrite; one writer at a time). Patient ids are stored only as salted "
        "hashes (--salt or HF_MEDVIS_SALT).",
    )
    parser.add_argument("src", help="raw images: folder, glob, or fsspec URL")
    parser.add_argument("dst", help="output folder or fsspec URL")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (default 256)")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8, help="stored depth (default 8)")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=1, help="3 keeps colour (pathology, fundus, dermatology)"
    )
    parser.add_argument(
        "--windows",
        nargs="+",
        default=None,
        help="CT: one channel per Hounsfield window (1 or 3): names (lung, mediastinum, bone, soft_tissue, brain, "
        "subdural, liver) or center,width",
    )
    parser.add_argument(
        "--labels", default=None, help="labels CSV (default: labels.csv next to SRC); see --labels-format"
    )
    parser.add_argument(
        "--masks_dir",
        "--masks-dir",
        "--masks",
        default=None,
        help="segmentation: folder of PNG class-index masks (the image's stem, its size; 255 = unlabelled) with "
        "classes.json; each mask is stored beside its pixels, resized the same way (nearest-neighbour)",
    )
    parser.add_argument(
        "--masks_rle",
        "--masks-rle",
        default=None,
        help="segmentation: CSV of run-length encoded masks, SIIM-ACR layout (ImageId, EncodedPixels; -1 = empty)",
    )
    parser.add_argument(
        "--mask_labels",
        "--mask-labels",
        default=None,
        help="mask class names, index = value, background first (default: classes.json in --masks_dir; RLE: "
        "background,foreground)",
    )
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    parser.add_argument("--shard-size", type=int, default=1000, help="inputs per shard (default 1000)")
    parser.add_argument("--format", dest="shard_format", default="parquet", choices=("parquet",), help="shard format")
    parser.add_argument("--salt", default=None, help="secret salt for patient-id hashing (default: $HF_MEDVIS_SALT)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset prepared there from another source (or with another salt); without it such a DST is "
        "refused. Re-preparing the same SRC needs no flag: the old set is replaced, finished shards reused",
    )
    parser.add_argument(
        "--storage_options",
        "--storage-options",
        default=None,
        help="fsspec options as JSON (default: Azure credentials from the environment); never printed",
    )
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="upload DST as a Hugging Face dataset repository 'owner/name' (private unless --hub-public)",
    )
    parser.add_argument("--hub-public", action="store_true", help="make the --push-to-hub repository public")
    add_labels_format_arguments(parser)
    parser.set_defaults(func=run)

    locate = subparsers.add_parser(
        "quarantine",
        help="name the source files that a prepare quarantined (or skipped), with the reasons",
        description="DST holds no file names (they may carry patient names or record numbers): its quarantine.jsonl "
        "names inputs by salted hash. This walks SRC again with the same salt and prints, for each quarantined or "
        "skipped file, its path and the reason, to this terminal only.",
    )
    locate.add_argument("dst", help="the prepared location (folder or fsspec URL)")
    locate.add_argument("--src", required=True, help="the raw images prepare read (folder, glob, or fsspec URL)")
    locate.add_argument("--salt", default=None, help="the salt of that prepare (default: $HF_MEDVIS_SALT)")
    locate.add_argument("--storage_options", "--storage-options", default=None, help="fsspec options as JSON")
    locate.set_defaults(func=run_locate)


def run_locate(args: argparse.Namespace) -> int:
    from .quarantine import locate_quarantined

    found = 0
    for path, reason in locate_quarantined(args.src, args.dst, salt=args.salt, storage_options=args.storage_options):
        print(f"{reason}\t{path}")
        found += 1
    print(f"{found} file(s) quarantined or skipped", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from .hub_push import HubPushError, check_push_ready, push_prepared_to_hub
    from .prepare import prepare

    if args.push_to_hub:
        try:
            check_push_ready(args.push_to_hub)
        except HubPushError as err:
            print(f"hf-medvis prepare: error: {err}", file=sys.stderr)
            return 2
    manifest = prepare(
        args.src,
        args.dst,
        size=args.size,
        bits=args.bits,
        labels=args.labels,
        workers=args.workers,
        shard_size=args.shard_size,
        salt=args.salt,
        storage_options=args.storage_options,
        shard_format_name=args.shard_format,
        labels_format=labels_format_from_args(args),
        channels=args.channels,
        windows=args.windows,
        overwrite=args.overwrite,
        masks_dir=args.masks_dir,
        masks_rle=args.masks_rle,
        mask_labels=args.mask_labels,
    )
    t = manifest["totals"]
    print(
        f"prepared {t['written']} of {t['inputs_seen']} inputs into {t['shards']} shards "
        f"({t['shards_resumed']} already done); quarantined {t['quarantined']}, skipped {t['skipped']} files that are "
        f"not images, labels rows without image {t['labels_rows_without_image']} -> {args.dst.split('?', 1)[0]}"
    )
    if t["quarantined"] or t["skipped"]:
        print(f"which files: hf-medvis quarantine {args.dst.split('?', 1)[0]} --src {args.src.split('?', 1)[0]}")
    if args.push_to_hub:
        try:
            url = push_prepared_to_hub(
                args.dst, manifest, args.push_to_hub, private=not args.hub_public, storage_options=args.storage_options
            )
        except HubPushError as err:
            print(
                f"hf-medvis prepare: error: {err}; the shards are complete in {args.dst.split('?', 1)[0]}: re-run to retry",
                file=sys.stderr,
            )
            return 2
        print(f"pushed to the Hub ({'public' if args.hub_public else 'private'}): {url}")
    return 0
