"""Learning-rate scaling with the global batch (MAE's linear rule)."""

from __future__ import annotations

from transformers import TrainingArguments


def global_batch_size(args: TrainingArguments) -> int:
    """Per-device batch x gradient accumulation x world size, as seen at run time."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


def scaled_learning_rate(base_learning_rate: float, global_batch: int, reference_batch: int = 256) -> float:
    """lr = base_lr x global_batch / 256 (Goyal et al.; used by MAE)."""
    return base_learning_rate * global_batch / reference_batch


def apply_base_learning_rate(args: TrainingArguments, base_learning_rate: float | None) -> str:
    """Sets ``args.learning_rate`` from the base lr (if given) and returns the line that explains it.

    With ``--deepspeed``, TrainingArguments already filled the DeepSpeed config's "auto" lr in __post_init__; refresh it
    so the optimizer DeepSpeed builds uses the derived value.
    """
    batch = global_batch_size(args)
    if base_learning_rate is None:
        return f"learning rate {args.learning_rate:g} (as given; global batch {batch})"
    args.learning_rate = scaled_learning_rate(base_learning_rate, batch)
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is not None:
        optimizer = ds_config.config.get("optimizer", {}).get("params", {})
        if "lr" in optimizer:
            optimizer["lr"] = args.learning_rate
    return (
        f"learning rate {args.learning_rate:.6g} = base_learning_rate {base_learning_rate:g} x global batch {batch} / 256 "
        f"(per-device {args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} "
        f"x world size {max(args.world_size, 1)})"
    )
