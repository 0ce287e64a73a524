"""The Trainer subclasses of the recipes: uint8 batches normalised (and optionally augmented) on the accelerator, exact
checkpoint reloads and resumes, shard streams loaded per rank, our model card; and for fine-tuning, the loss (BCE or
cross-entropy) and layer-wise lr decay; for segmentation, the model's own loss and the same lr decay."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import ProgressCallback, Trainer
from transformers.trainer_utils import TrainOutput

from ..core.local_disk import write_failure_kind
from ..core.param_count import count_parameters
from ..data.labels import MULTI_LABEL
from ..data.stream_plan import rank_batch_counts
from ..data.streaming import StreamDataLoader, stream_control
from ..data.transforms import SeededAugmentation, normalize_batch, normalize_unit_batch
from ..models.param_groups import vit_param_groups
from ..models.weights import WeightLoadError, load_saved_weights
from .callbacks.checkpoint_commit import CheckpointCommitCallback
from .callbacks.common import find_callback
from .callbacks.reporters import arrange_reporters
from .callbacks.stream_state import StreamStateCallback
from .checkpoints import is_complete, mark_incomplete
from .deepspeed_config import prefer_torch_adam_without_cuda
from .outputs import (
    ResumeMismatchError,
    check_model_matches_checkpoint,
    describe_write_failure,
    newest_checkpoint_bytes,
)
from .run import one_line_exit
from .sample_trace import BATCH_KEY as TRACE_BATCH_KEY
from .sample_trace import SampleTrace
from .worker_signals import workers_ignore_sigterm

logger = logging.getLogger(__name__)


class _RanksStopTogether(StreamDataLoader):
    """The DataLoader of one rank's share of a shard stream, ending the epoch on every rank after the same number of
    batches: the fewest any rank has.

    Ranks must take the same number of optimizer steps per epoch, or DDP's gradient all-reduce waits forever. Their
    shares can differ by a batch or more (a short last shard, shards that do not divide among ranks or workers, each
    worker's partial last batch). Every rank computes every rank's count from the manifest (``stream_plan``: shard
    sizes, world size, workers, batch size, drop_last, the resumed position) and stops after the smallest: no
    communication and no host sync while the epoch runs. The samples left on the longer ranks are not seen in that
    epoch. This only truncates the end of the epoch, so the batches consumed before a checkpoint are still a prefix of
    each rank's deterministic stream, which is what StreamStateCallback replays on resume.

    A count that could be wrong fails loudly instead of hanging: a rank whose loader runs out before the agreed count
    raises (torchrun then stops the others), and so does the shortest rank when its loader has a batch left over.

    Where the count cannot be known in advance, the ranks agree before every batch instead (all-reduce MIN of "I have
    one"; on the CPU with a gloo process group, a device sync per batch with NCCL): with ``skip_bad_shards`` a shard
    found unreadable while training shrinks one rank's share by a number no other rank can know, and a stream cut by
    ``--max_train_samples`` (``take``) splits its samples among ranks and workers its own way."""

    def __init__(self, *args: Any, agree_on: torch.device | None = None, **kwargs: Any) -> None:
        """``agree_on``: the device of the per-batch agreement; None: stop after the computed count."""
        super().__init__(*args, **kwargs)
        self.agree_on = agree_on

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        if self.agree_on is not None:
            yield from _agree_each_batch(batches, self.agree_on)
            return
        control, epoch = self.stream, self.dataset.epoch
        options = {"batch_size": self.batch_size, "num_workers": self.num_workers, "drop_last": self.drop_last}
        counts = rank_batch_counts(control, epoch=epoch, **options)
        stop, own = min(counts), counts[control.rank]
        if control.rank == 0 and stop < max(counts):
            logger.info("stream epoch %d: ranks deliver %s batches; every rank stops after %d", epoch, counts, stop)
        for index in range(stop):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(
                    f"rank {control.rank}'s shard stream ended after {index} batches of the {own} computed for it "
                    f"(every rank stops after {stop}): the manifest's sample counts or this datasets version's split "
                    "do not match the plan (stream_plan.py); stopping rather than leaving the other ranks waiting"
                )
            yield batch
        if own == stop and next(batches, None) is not None:
            raise RuntimeError(
                f"rank {control.rank}'s shard stream has more than the {own} batches computed for it: the manifest's "
                "sample counts or this datasets version's split do not match the plan (stream_plan.py)"
            )


def _agree_each_batch(batches: Iterator[Any], device: torch.device) -> Iterator[Any]:
    while True:
        batch = next(batches, None)
        have = torch.full((1,), 0 if batch is None else 1, device=device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not have.item():
            return
        yield batch


def _agreement_device(args: Any) -> torch.device:
    """The CPU when the process group has a CPU backend (gloo): the per-batch agreement then never waits for the device."""
    backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else ""
    return torch.device("cpu") if "gloo" in backend else args.device


class MedVisTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        model_card_writer: Callable[[str], None] | None = None,
        train_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sample_augmentation: SeededAugmentation | None = None,
        **kwargs: Any,
    ) -> None:
        """``train_augment`` (e.g. ``transforms.DeviceRandomResizedCrop``) maps a uint8 training batch on the device to
        float [0, 1] crops; the workers then only hand over fixed-size uint8 images. Evaluation batches skip it.
        ``sample_augmentation``: the training set's per-sample seeded augmentation, told the epoch before each epoch."""
        super().__init__(*args, **kwargs)
        self.train_augment = train_augment
        self.sample_augmentation = sample_augmentation
        self._deferred_rng_checkpoint: str | None = None
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and prefer_torch_adam_without_cuda(plugin.deepspeed_config):
            logger.info("no CUDA: DeepSpeed uses torch's AdamW (torch_adam) instead of compiling its fused Adam")
        # Checkpoints count for resume only once marked complete (checkpoints.py); tracing is opt-in (sample_trace.py).
        if find_callback(self, CheckpointCommitCallback) is None:
            self.add_callback(CheckpointCommitCallback())
        # The Trainer puts its reporters (--report_to) before our callbacks: the keys ours add to the logs (throughput,
        # alerts) must be there before MLflow or TensorBoard read them.
        arrange_reporters(self.callback_handler)
        self.sample_trace = SampleTrace.from_env(self.args.process_index)
        if self.sample_trace is not None:
            self.data_collator = self.sample_trace.wrap_collator(self.data_collator)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.model_card_writer = model_card_writer
        # Self-supervised models return a loss without a labels key; let evaluation report it.
        self.can_return_loss = True

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        # The commit marker must come after every other on_save (e.g. the stream position), whenever they were added.
        commit = [cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointCommitCallback)]
        for callback in commit:
            self.callback_handler.callbacks.remove(callback)
            self.callback_handler.callbacks.append(callback)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self._check_resume_fits(os.fspath(resume_from_checkpoint))
        with self._output_writes("the run's outputs"):
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_resume_fits(self, checkpoint: str) -> None:
        """Before anything is loaded or written: a checkpoint of another model (image size, preset, classes) or, on a
        shard stream, of other batches or data is one line naming the values, not a traceback mid-way."""
        try:
            check_model_matches_checkpoint(self.model.config, checkpoint)
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, StreamStateCallback):
                    callback.check_resume(self.args, checkpoint)
        except ResumeMismatchError as err:
            raise one_line_exit(str(err)) from None

    # -- a full or read-only output folder ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _output_writes(self, what: str) -> Iterator[None]:
        """A write into output_dir that fails because its filesystem is full or read-only -> one line naming the
        location and the need, exit status 1. A checkpoint it interrupted has no completion marker (nothing trusts
        it) and is removed, which gives its space back; the other errors keep their traceback."""
        try:
            yield
        except Exception as err:
            output_dir = self.args.output_dir
            need = newest_checkpoint_bytes(output_dir) or self._checkpoint_bytes_estimate()
            kind = write_failure_kind(err, output_dir, need)
            if kind is None:
                raise
            partial = Path(output_dir) / f"checkpoint-{self.state.global_step}"
            if partial.is_dir() and not is_complete(partial):
                what = partial.name
                if self.args.should_save:
                    shutil.rmtree(partial, ignore_errors=True)
            self._close_progress_bars()  # else the bar, closed at exit, is printed after the error line
            raise one_line_exit(describe_write_failure(kind, output_dir, what, need)) from None

    def _checkpoint_bytes_estimate(self) -> int:
        """Before the first checkpoint: the weights and Adam's two moments, in fp32."""
        return 3 * 4 * count_parameters(self.model)

    def _close_progress_bars(self) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback):
                for name in ("training_bar", "prediction_bar"):
                    bar = getattr(callback, name, None)
                    if bar is not None:
                        bar.close()
                        setattr(callback, name, None)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:  # a checkpoint's weights: train() reports a failure, naming the checkpoint
            return super().save_model(output_dir, _internal_call)
        with self._output_writes("the final model"):
            return super().save_model(output_dir, _internal_call)

    def save_state(self) -> None:
        with self._output_writes("trainer_state.json"):
            return super().save_state()

    def save_metrics(self, split: str, metrics: dict[str, float], combined: bool = True) -> None:
        with self._output_writes(f"{split}_results.json"):
            return super().save_metrics(split, metrics, combined)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        # Resumed from a checkpoint at (or past) --max_steps, e.g. one saved on SIGTERM at the last step: the Trainer
        # would take one more step before it checks the limit. Nothing is left to train; finish as the run would have.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        control = stream_control(self.train_dataset)
        if self.sample_augmentation is not None:  # before this epoch's DataLoader workers take their copy
            stream_epoch = control.epoch if control is not None else None
            self.sample_augmentation.epoch = stream_epoch if stream_epoch is not None else kwargs["epoch"]
        checkpoint = kwargs.get("resume_from_checkpoint")
        if control is not None and checkpoint is not None and kwargs.get("epoch") == kwargs.get("epochs_trained"):
            # A positioned stream: the Trainer skips nothing and restores no RNG state; do it in the right place.
            if control.skip and control.epoch == control.skip_epoch:
                self._deferred_rng_checkpoint = checkpoint
            else:
                self._load_rng_state(checkpoint)
        super()._run_epoch(*args, **kwargs)

    # -- exact resume of random draws ----------------------------------------------------------------------------------
    # The checkpoint's RNG state is the one after its step. An uninterrupted run draws from it next in the forward of the
    # following step (MAE masks, dropout): batches come from workers or through per-sample seeded augmentation
    # (SeededAugmentation), which draw nothing from the training process's generators, but creating a DataLoader
    # iterator does draw (its base seed). So a resume into a new epoch restores the state before that epoch's iterator
    # exists (the uninterrupted run crossed the epoch boundary after the checkpoint), and a resume inside an epoch
    # restores it once the resumed iterator has delivered its first batches -- the Trainer's own order for map-style
    # data, and ours (``_deferred_rng_checkpoint``) for a shard stream positioned by StreamStateCallback.

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> Any:
        batches = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._deferred_rng_checkpoint is not None:
            checkpoint, self._deferred_rng_checkpoint = self._deferred_rng_checkpoint, None
            super()._load_rng_state(checkpoint)
        return batches

    def get_eval_dataloader(self, *args: Any, **kwargs: Any) -> DataLoader:
        return workers_ignore_sigterm(super().get_eval_dataloader(*args, **kwargs))

    def get_test_dataloader(self, *args: Any, **kwargs: Any) -> DataLoader:
        return workers_ignore_sigterm(super().get_test_dataloader(*args, **kwargs))

    def get_train_dataloader(self) -> DataLoader:
        return workers_ignore_sigterm(self._train_dataloader())

    def _train_dataloader(self) -> DataLoader:
        """A shard stream is not handed to ``accelerator.prepare``. Under several processes it is already this rank's
        share (``split_by_node``, the split that StreamStateCallback replays on resume): accelerate would shard it again
        (``IterableDataset.shard`` or ``IterableDatasetShard``: each rank would see 1/world² of the data, in an order the
        resume twin does not model) or, with ``dispatch_batches``, read everything on rank 0. And its own loader
        (``StreamDataLoader``) keeps the batch order of an interrupted epoch on resume. Nothing accelerate's wrapper adds
        is needed: the Trainer moves batches to the device (``_prepare_inputs``) and sets gradient sync itself, the
        stream's epoch comes from StreamStateCallback, and equal step counts across ranks from ``_RanksStopTogether``."""
        control = stream_control(self.train_dataset)
        if control is None:
            return super().get_train_dataloader()
        args = self.args
        if args.world_size > 1 and (not control.split_by_node or control.world_size != args.world_size):
            raise ValueError(
                f"the training stream must be split by node for the {args.world_size} processes "
                f"(it was loaded with split_by_node={control.split_by_node}, world size {control.world_size})"
            )
        options: dict[str, Any] = {
            "batch_size": self._train_batch_size,
            "collate_fn": self._get_collator_with_removed_columns(self.data_collator, description="Training"),
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "multiprocessing_context": args.dataloader_multiprocessing_context,
            "prefetch_factor": args.dataloader_prefetch_factor,
            "drop_last": args.dataloader_drop_last,
        }
        if args.world_size > 1:
            # skip_bad_shards: a shard skipped at read time changes one rank's count, so those runs keep the per-batch
            # agreement; so does a stream cut by take() (--max_train_samples), which the plan does not model.
            planned = getattr(self.train_dataset, "batch_plan", False) and not control.skip_bad_shards
            return _RanksStopTogether(
                self.train_dataset, agree_on=None if planned else _agreement_device(args), **options
            )
        return StreamDataLoader(self.train_dataset, **options)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.args.should_save:  # re-saving into an existing folder: incomplete until the commit callback says so
            mark_incomplete(os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # The Trainer's reload skips (with a warning) every weight transformers 5 saved under a legacy name; ours goes
        # through the same name conversion as from_pretrained and fails on any key that does not match.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        try:
            loaded = load_saved_weights(self.model if model is None else model, resume_from_checkpoint)
        except WeightLoadError as err:  # before anything is written: one line, like the checks of _check_resume_fits
            raise one_line_exit(str(err)) from None
        logger.info("resuming from %s: %d tensors restored", resume_from_checkpoint, loaded)

    def _load_best_model(self) -> None:
        # Same reason as _load_from_checkpoint: the Trainer's version would keep the last step's encoder.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        checkpoint = self.state.best_model_checkpoint
        logger.info(
            "loading the best model from %s (%s %s)",
            checkpoint,
            self.args.metric_for_best_model,
            self.state.best_metric,
        )
        load_saved_weights(self.model, checkpoint)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        keys = inputs.pop(TRACE_BATCH_KEY, None) if isinstance(inputs, dict) else None
        if keys is not None and self.sample_trace is not None and self.model.training:
            self.sample_trace.record(self.state.global_step + 1, keys)
        inputs = super()._prepare_inputs(inputs)  # moves the uint8 batch to the device first: 4x fewer bytes
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
            num_channels = getattr(self.model.config, "num_channels", pixel_values.shape[1])
            if self.train_augment is not None and self.model.training:  # training_step calls model.train() first
                unit = self.train_augment(pixel_values)
                inputs["pixel_values"] = normalize_unit_batch(unit, self.image_mean, self.image_std, num_channels)
            else:
                inputs["pixel_values"] = normalize_batch(pixel_values, self.image_mean, self.image_std, num_channels)
        return inputs

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # push_to_hub() calls this and would overwrite README.md with a generic card.
        if self.model_card_writer is not None and self.is_world_process_zero():
            self.model_card_writer(self.args.output_dir)


class ClassificationTrainer(MedVisTrainer):
    """BCE (optional ``pos_weight``) or cross-entropy (optional label smoothing), and layer-wise lr decay groups."""

    # compute_loss returns a per-batch mean: the Trainer must divide it by the gradient-accumulation steps. (ViT's
    # forward takes **kwargs, which would otherwise make the Trainer assume a loss normalised by num_items_in_batch.)
    loss_is_scaled_for_ga = False

    def __init__(
        self, *args: Any, pos_weight: torch.Tensor | None = None, layer_decay: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pos_weight = pos_weight
        self._pos_weights: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.layer_decay = layer_decay
        self.can_return_loss = False  # the loss needs labels; Trainer's label handling applies

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        if self.model.config.problem_type == MULTI_LABEL:  # self.model: `model` may be wrapped (DDP, DeepSpeed)
            pos_weight = None
            if self.pos_weight is not None:  # copied to the device once: a copy every step would sync the host with it
                key = (logits.device, logits.dtype)
                if key not in self._pos_weights:
                    self._pos_weights[key] = self.pos_weight.to(*key)
                pos_weight = self._pos_weights[key]
            # BCE over the known labels only: -1 marks an unknown one (CheXpert's uncertain under U-Ignore). Masked
            # rather than branched, so no step waits on the host to look at the labels.
            labels = labels.to(logits.dtype)
            known = (labels >= 0).to(logits.dtype)
            per_label = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, labels.clamp(min=0), pos_weight=pos_weight, reduction="none"
            )
            loss = (per_label * known).sum() / known.sum().clamp(min=1)
        else:
            loss = torch.nn.functional.cross_entropy(
                logits, labels.long(), label_smoothing=self.args.label_smoothing_factor
            )
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        return _layer_decay_optimizer(self, model)


def _layer_decay_optimizer(trainer: Trainer, model: torch.nn.Module | None) -> torch.optim.Optimizer:
    """The fine-tuning Trainers' ``create_optimizer``: the Trainer's optimizer class over ``vit_param_groups`` (layer-wise
    lr decay ``trainer.layer_decay``, no weight decay on norms, biases and tokens)."""
    if trainer.optimizer is None:
        opt_model = trainer.model if model is None else model
        args = trainer.args
        groups = vit_param_groups(opt_model, args.learning_rate, args.weight_decay, trainer.layer_decay)
        for group in groups:
            group.pop("names")
        optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(args, opt_model)
        trainer.optimizer = optimizer_cls(groups, **optimizer_kwargs)
    return trainer.optimizer


class SegmentationTrainer(MedVisTrainer):
    """The model's own loss (cross-entropy + Dice, labels of 255 ignored: ``modeling_hf_medvis_seg``) and layer-wise lr
    decay. Evaluation should keep per-image confusion counts, not full-size logits: the recipe passes the evaluation
    wing's ``logits_to_counts`` as ``preprocess_logits_for_metrics``."""

    # The model's loss is a per-batch mean (its forward takes no **kwargs): the Trainer divides it for accumulation.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, layer_decay: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay
        self.can_return_loss = False  # the loss needs labels; Trainer's label handling applies

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        return _layer_decay_optimizer(self, model)
