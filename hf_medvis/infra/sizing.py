"""Per-GPU memory for a training setup, and which Azure GPU SKUs it fits.

- Model states (parameters, gradients, optimizer states): DeepSpeed's ZeRO formulas (≥ 0.14.3), per stage.
- Activations: *measured*: one forward pass of the real model on the meta device at batch 1 and 2, recording the bytes
  autograd saves for backward (``saved_tensors_hooks``, parameters excluded), then scaled linearly with the batch. The
  meta pass materializes attention probabilities, so with flash / memory-efficient SDPA on GPU this is an upper bound.
- Margin: ``margin`` × (model states + activations) for allocator fragmentation and transient buffers, plus
  ``overhead_gib`` per GPU for the CUDA context, cuBLAS/NCCL workspaces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig

from ..core.param_count import parameter_counts
from .catalog import azure_skus
from .modelspec import build_meta_model, example_input, training_loss

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30


def model_states_bytes(
    params: int, largest_layer: int, zero: int, precision: str, n_gpus: int, offload: bool = False
) -> int:
    """Per-GPU bytes of parameters + gradients + Adam states.

    Mixed precision (bf16/fp16) with ZeRO 2/3 follows DeepSpeed exactly: ZeRO-2 2P + 18P/N (offload: 2P); ZeRO-3
    4L + 18P/N (optimizer offload: 4L + 2P/N). The 18 bytes/param are 2 (16-bit grads) + 4 (fp32 grads) + 4 (fp32
    master params) + 8 (Adam moments). ZeRO-1 partitions only the 16 fp32 bytes: 4P + 16P/N. Without ZeRO (DDP/AMP)
    every GPU holds fp32 params, grads and Adam states: 16P. In fp32 the 16-bit copies disappear: 16P/N-style terms with
    4-byte params and grads.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if offload and zero == 0:
        raise ValueError("--offload needs ZeRO (stage 1, 2 or 3)")
    n = max(1, n_gpus)
    p, big_l = params, largest_layer
    if precision == "fp32":
        # fp32 params 4 + fp32 grads 4 + Adam 8; ZeRO partitions optimizer (1), + grads (2), + params (3).
        if zero == 0:
            return 16 * p
        if zero == 1:
            return 8 * p + (0 if offload else int(8 * p / n))
        if zero == 2:
            return 4 * p + (0 if offload else int(12 * p / n))
        return 4 * big_l + (int(4 * p / n) if offload else int(16 * p / n))
    if zero == 0:
        return 16 * p
    if zero == 1:
        return 4 * p + (0 if offload else int(16 * p / n))
    if zero == 2:
        return 2 * p if offload else 2 * p + int(18 * p / n)
    return 4 * big_l + (int(2 * p / n) if offload else int(18 * p / n))


def measure_activation_bytes(config: PretrainedConfig, batch_size: int, precision: str) -> int:
    """Bytes autograd saves for backward in one forward pass at ``batch_size`` (meta device: shapes only)."""
    dtype = PRECISIONS[precision]
    model = build_meta_model(config, dtype)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata  # views of one buffer share a storage: count it once
        if key not in param_storages:
            saved[key] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        training_loss(model, example_input(config, batch_size, dtype))
    return sum(saved.values())


@dataclass
class SkuFit:
    name: str
    gpu: str
    gpus_per_vm: int
    gpu_memory_gib: float
    fits: bool
    headroom_bytes: int
    max_batch_size: int
    enough_gpus_per_vm: bool


@dataclass
class SizeEstimate:
    model: str
    task: str
    image_size: int
    batch_size: int
    precision: str
    zero: int
    offload: bool
    gpus_per_node: int
    nodes: int
    parameters: int
    trainable_parameters: int
    largest_layer_parameters: int
    model_states_bytes: int
    activations_bytes: int
    activations_per_sample_bytes: int
    margin_bytes: int
    total_bytes: int
    activations_method: str
    skus: list[SkuFit] = field(default_factory=list)
    recommendation: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_gpu"] = {
            k: data[k] for k in ("model_states_bytes", "activations_bytes", "margin_bytes", "total_bytes")
        }
        return data


def _total(
    states: int, act_fixed: int, act_per_sample: int, batch: int, margin: float, overhead: int
) -> tuple[int, int]:
    """(total bytes, margin bytes) for a batch size."""
    core = states + act_fixed + act_per_sample * batch
    margin_bytes = int(core * margin) + overhead
    return core + margin_bytes, margin_bytes


def estimate_size(
    config: PretrainedConfig,
    model_name: str,
    task: str,
    batch_size: int,
    precision: str = "bf16",
    zero: int = 0,
    offload: bool = False,
    gpus_per_node: int = 1,
    nodes: int = 1,
    margin: float = 0.10,
    overhead_gib: float = 1.0,
) -> SizeEstimate:
    """Per-GPU memory for ``batch_size`` images per GPU, and the fit on every Azure SKU in the data table."""
    if batch_size < 1 or gpus_per_node < 1 or nodes < 1:
        raise ValueError("--batch-size, --gpus-per-node and --nodes must be >= 1")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    counts = parameter_counts(build_meta_model(config))
    states = model_states_bytes(
        counts["total"], counts["largest_layer"], zero, precision, gpus_per_node * nodes, offload
    )
    one = measure_activation_bytes(config, 1, precision)
    two = measure_activation_bytes(config, 2, precision)
    per_sample = max(0, two - one)
    fixed = max(0, one - per_sample)  # batch-independent saved tensors (e.g. MAE's shared mask noise bookkeeping)
    activations = fixed + per_sample * batch_size
    overhead = int(overhead_gib * GIB)
    total, margin_bytes = _total(states, fixed, per_sample, batch_size, margin, overhead)
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    estimate = SizeEstimate(
        model=model_name,
        task=task,
        image_size=image_size,
        batch_size=batch_size,
        precision=precision,
        zero=zero,
        offload=offload,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        parameters=counts["total"],
        trainable_parameters=counts["trainable"],
        largest_layer_parameters=counts["largest_layer"],
        model_states_bytes=states,
        activations_bytes=activations,
        activations_per_sample_bytes=per_sample,
        margin_bytes=margin_bytes,
        total_bytes=total,
        activations_method="measured: bytes saved for backward in a meta-device forward at batch 1 and 2, scaled "
        "linearly (attention probabilities counted as materialized: upper bound with flash/efficient SDPA)",
    )
    for sku in azure_skus():
        capacity = sku["gpu_memory_mib"] * 2**20
        budget = (capacity - overhead) / (1 + margin) - states - fixed
        max_batch = max(0, math.floor(budget / per_sample)) if per_sample else 0
        estimate.skus.append(
            SkuFit(
                name=sku["name"],
                gpu=sku["gpu"],
                gpus_per_vm=sku["gpus"],
                gpu_memory_gib=round(capacity / GIB, 1),
                fits=total <= capacity,
                headroom_bytes=capacity - total,
                max_batch_size=max_batch,
                enough_gpus_per_vm=sku["gpus"] >= gpus_per_node,
            )
        )
    estimate.recommendation = recommend(estimate)
    return estimate


def recommend(estimate: SizeEstimate) -> str:
    need = estimate.total_bytes / GIB
    setup = (
        f"{estimate.task} {estimate.model} at {estimate.image_size}px, batch {estimate.batch_size}/GPU, {estimate.precision}, "
        f"ZeRO-{estimate.zero}{' + offload' if estimate.offload else ''} on {estimate.nodes}x{estimate.gpus_per_node} GPUs"
    )
    shaped = [s for s in estimate.skus if s.enough_gpus_per_vm]
    fitting = sorted((s for s in shaped if s.fits), key=lambda s: (s.gpu_memory_gib, s.gpus_per_vm))
    if fitting:
        best = fitting[0]
        return (
            f"{setup} needs ~{need:.1f} GiB per GPU: smallest fitting SKU with >= {estimate.gpus_per_node} GPUs is "
            f"{best.name} ({best.gpu}, {best.headroom_bytes / GIB:.1f} GiB headroom, batch up to {best.max_batch_size}/GPU)."
        )
    candidates = shaped or estimate.skus
    biggest = max(candidates, key=lambda s: s.gpu_memory_gib)
    hint = (
        f"lower the batch to {biggest.max_batch_size}/GPU on {biggest.name}"
        if biggest.max_batch_size
        else "the model states alone do not fit"
    )
    more = "" if estimate.zero == 3 else f", or use a higher ZeRO stage (--zero {min(3, estimate.zero + 1)})"
    return f"{setup} needs ~{need:.1f} GiB per GPU: no SKU fits; {hint}{more}, gradient accumulation or --offload."
