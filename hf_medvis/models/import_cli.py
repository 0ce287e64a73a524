"""``hf-medvis import-weights``: a public MAE / medical_mae / timm ViT / DINOv2 checkpoint -> a transformers folder."""

from __future__ import annotations

import argparse

# The conversion (torch, transformers) is imported inside run(): `hf-medvis --help` loads every subcommand module and
# must not load torch (tests/test_architecture.py). For the same reason --format is checked by import_weights (one
# list of layouts, import_weights.FORMATS), not by argparse choices.


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-weights",
        help="convert a facebookresearch/mae, medical_mae, timm ViT or original DINOv2 checkpoint into a "
        "transformers folder",
        description="Converts SRC (.pth/.pt/.bin/.safetensors) into a transformers folder with an image processor: "
        "an MAE checkpoint with decoder -> ViTMAEForPreTraining; a timm ViT or MAE encoder -> ViTModel (a CLS-token "
        "head -> ViTForImageClassification), which the fine-tune recipe takes as --model_name_or_path; original "
        "DINOv2 (RAD-DINO) -> Dinov2Model (Dinov2WithRegistersModel with register tokens). Strict: every source "
        "tensor is placed or the import fails naming it. For lambert-x/medical_mae checkpoints pass "
        "--image-mean 0.5056 --image-std 0.252 (NIH ChestX-ray14 statistics).",
    )
    parser.add_argument("src", metavar="SRC", help="the checkpoint file (.pth, .pt, .bin or .safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    parser.add_argument(
        "--format",
        default="auto",
        metavar="LAYOUT",
        help="the source layout: auto (default: detected from the keys), mae, timm or dinov2",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="input size; must match the position embeddings (DINOv2: the processor's size)",
    )
    parser.add_argument("--patch-size", type=int, metavar="N", help="checked against the checkpoint's patch embedding")
    parser.add_argument(
        "--num-attention-heads",
        type=int,
        metavar="N",
        help="encoder heads (default: from the saved model name, else the standard size's)",
    )
    parser.add_argument(
        "--decoder-num-attention-heads",
        type=int,
        metavar="N",
        help="MAE decoder heads (default 16, as in every MAE decoder)",
    )
    parser.add_argument(
        "--image-mean", type=float, nargs="+", metavar="X", help="1 or 3 values (default ImageNet 0.485 0.456 0.406)"
    )
    parser.add_argument(
        "--image-std", type=float, nargs="+", metavar="X", help="1 or 3 values (default ImageNet 0.229 0.224 0.225)"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickled objects beyond tensors (MAE's saved args); unpickling can run code: trusted files only",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .import_weights import ImportOptions, import_weights

    for name in ("image_size", "patch_size", "num_attention_heads", "decoder_num_attention_heads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    options = ImportOptions(
        format=args.format,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_attention_heads=args.num_attention_heads,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        image_mean=args.image_mean,
        image_std=args.image_std,
        trust_pickle=args.trust_pickle,
        overwrite=args.overwrite,
    )
    report = import_weights(args.src, args.out, options, echo=print)
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    return 0
