"""``hf-medvis size``: per-GPU memory of a training setup and the Azure GPU SKUs it fits."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ..core.tasks import DEPRECATED_ALIASES, SEGMENTATION, TASKS, resolve_task

if TYPE_CHECKING:
    from .sizing import SizeEstimate

# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).

GIB = 2**30


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "size",
        help="estimate per-GPU memory (DeepSpeed ZeRO formulas + measured activations) and the Azure SKUs that fit",
        description="Model states by DeepSpeed's ZeRO formulas per stage; activations measured from one meta-device "
        "forward pass (no GPU needed) and scaled with the batch; plus a margin. Lists every Azure GPU SKU with fit, "
        "headroom and the largest batch per GPU that fits.",
    )
    parser.add_argument(
        "--model",
        default="vit-base",
        help="a preset of hf_medvis/core/presets.json (vit-base, vit-large, vit-huge, ...) or CONFIG_OR_DIR "
        "(config.json): a ViT / ViT-MAE, or for --task classification any image classifier transformers builds "
        "(DeiT, BEiT, Dinov2, Swin, ConvNeXt, ...)",
    )
    parser.add_argument(
        "--task",
        default="mae",
        choices=[*TASKS, *DEPRECATED_ALIASES],
        metavar="{" + ",".join(TASKS) + "}",  # deprecated spellings are accepted, not advertised
        help="MAE pretraining or classification (segmentation is refused: size its encoder as classification)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per GPU per micro-batch (default 64)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="default bf16")
    parser.add_argument(
        "--zero", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (0 = plain DDP)"
    )
    parser.add_argument("--offload", action="store_true", help="offload optimizer states to CPU (ZeRO only)")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--num-labels", type=int, default=14, help="classes for --task classification (default 14, NIH)"
    )
    parser.add_argument(
        "--margin", type=float, default=0.10, help="extra fraction for fragmentation/transients (default 0.10)"
    )
    parser.add_argument(
        "--overhead-gib", type=float, default=1.0, help="per-GPU CUDA context + workspaces (default 1.0)"
    )
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .modelspec import build_config
    from .sizing import estimate_size

    if args.image_size < 1 or args.margin < 0 or args.overhead_gib < 0:
        raise ValueError("--image-size must be >= 1, --margin and --overhead-gib >= 0")
    task = resolve_task(args.task)
    if task == SEGMENTATION:
        # The segmenter's decoder is built in hf_medvis.models, which infra does not import (docs/architecture.md).
        raise ValueError(
            "hf-medvis size does not size segmentation models: size their ViT encoder with --task classification "
            "(the segmentation decoder is not counted there)"
        )
    config = build_config(args.model, task, args.image_size, args.num_labels)
    estimate = estimate_size(
        config,
        f"{args.model} ({config.model_type})",  # the architecture sized, as its model_type
        task,
        args.batch_size,
        precision=args.precision,
        zero=args.zero,
        offload=args.offload,
        gpus_per_node=args.gpus_per_node,
        nodes=args.nodes,
        margin=args.margin,
        overhead_gib=args.overhead_gib,
    )
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_estimate(estimate))
    return 0


def format_estimate(e: SizeEstimate) -> str:
    lines = [
        f"{e.task} {e.model} {e.image_size}px: {e.parameters / 1e6:.1f}M parameters ({e.trainable_parameters / 1e6:.1f}M trainable, "
        f"largest layer {e.largest_layer_parameters / 1e6:.2f}M)",
        f"per GPU at batch {e.batch_size}, {e.precision}, ZeRO-{e.zero}{' + offload' if e.offload else ''}, "
        f"{e.nodes}x{e.gpus_per_node} GPUs:",
        f"  model states  {e.model_states_bytes / GIB:8.2f} GiB  (DeepSpeed ZeRO formulas)",
        f"  activations   {e.activations_bytes / GIB:8.2f} GiB  ({e.activations_per_sample_bytes / 2**20:.1f} MiB/sample, measured on meta device)",
        f"  margin        {e.margin_bytes / GIB:8.2f} GiB",
        f"  total         {e.total_bytes / GIB:8.2f} GiB",
        f"  {'SKU':<28}{'GPU':<16}{'GPUs':>5}{'GiB':>7}  {'fits':<5}{'headroom':>10}{'max batch':>11}",
    ]
    for s in e.skus:
        lines.append(
            f"  {s.name:<28}{s.gpu:<16}{s.gpus_per_vm:>5}{s.gpu_memory_gib:>7.1f}  {'yes' if s.fits else 'no':<5}"
            f"{s.headroom_bytes / GIB:>9.1f}G{s.max_batch_size:>11}"
            + ("" if s.enough_gpus_per_vm else "  (fewer GPUs/VM than --gpus-per-node)")
        )
    lines.append(e.recommendation)
    return "\n".join(lines)
