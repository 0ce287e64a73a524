"""Learning-rate scaling with the global batch (MAE's linear rule)."""

from __future__ import annotations

from transformers import TrainingArguments

from .deepspeed_config import load_deepspeed_config


def global_batch_size(args: TrainingArguments) -> int:
    """Per-device batch x gradient accumulation x world size, as seen at run time."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


def scaled_learning_rate(base_learning_rate: float, global_batch: int, reference_batch: int = 256) -> float:
    """lr = base_lr x global_batch / 256 (Goyal et al.; used by MAE)."""
    return base_learning_rate * global_batch / reference_batch


def apply_base_learning_rate(args: TrainingArguments, base_learning_rate: float | None) -> str:
    """Sets ``args.learning_rate`` from the base lr (if given) and returns the line that explains it."""
    batch = global_batch_size(args)
    if base_learning_rate is None:
        return (
            f"learning rate {args.learning_rate:g} (as given); global batch {batch} = per-device "
            f"{args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} "
            f"x world size {max(args.world_size, 1)}"
        )
    args.learning_rate = scaled_learning_rate(base_learning_rate, batch)
    refresh_deepspeed_lr(args)
    return (
        f"learning rate {args.learning_rate:.6g} = base_learning_rate {base_learning_rate:g} x global batch {batch} / 256 "
        f"(per-device {args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} "
        f"x world size {max(args.world_size, 1)})"
    )


# DeepSpeed config entries the Trainer fills from args.learning_rate.
_DEEPSPEED_LR_KEYS = (("optimizer", "params", "lr"), ("scheduler", "params", "warmup_max_lr"))


def refresh_deepspeed_lr(args: TrainingArguments) -> None:
    """With ``--deepspeed FILE``, TrainingArguments filled the config's "auto" lr in __post_init__, before the recipe
    derived its lr: write the derived lr into the entries that were "auto" in the file, so the optimizer DeepSpeed builds
    uses it. (With accelerate's DeepSpeed plugin the config is filled when the Trainer is built, after this.) A literal
    lr in the file is left alone; ``deepspeed_config.check_deepspeed_config`` reports it as a contradiction."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is None or not getattr(args, "deepspeed", None):
        return

    original, _ = load_deepspeed_config(args.deepspeed)
    for path in _DEEPSPEED_LR_KEYS:
        raw_node, live_node = original, ds_config.config
        for key in path[:-1]:
            raw_node, live_node = raw_node.get(key, {}), live_node.get(key, {})
        if raw_node.get(path[-1]) == "auto" and path[-1] in live_node:
            live_node[path[-1]] = args.learning_rate
