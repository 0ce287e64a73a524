"""The Trainer methods our subclasses override still exist in transformers, under the same names and with the
arguments we pass on: a transformers release that renames or re-signs one fails here, by name, instead of silently
skipping our override (a renamed private hook is simply never called)."""

import inspect

import pytest
from transformers import Trainer

from hf_medvis.training.trainer import ClassificationTrainer, MedVisTrainer

# Methods of our subclasses that are ours alone (not overrides), each reached only from our own overrides.
OWN_HELPERS = {
    "_check_resume_fits",
    "_output_writes",
    "_checkpoint_bytes_estimate",
    "_close_progress_bars",
    "_train_dataloader",
}


def _overrides(cls: type) -> list[str]:
    return sorted(
        name
        for name, value in vars(cls).items()
        if callable(value) and name not in OWN_HELPERS and (not name.startswith("__") or name == "__init__")
    )


@pytest.mark.parametrize("cls", [MedVisTrainer, ClassificationTrainer], ids=lambda c: c.__name__)
def test_every_override_exists_in_the_trainer_with_compatible_parameters(cls):
    missing, changed = [], []
    for name in _overrides(cls):
        base = getattr(Trainer, name, None)
        if base is None:
            missing.append(name)
            continue
        ours = inspect.signature(getattr(cls, name)).parameters
        theirs = inspect.signature(base).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in ours.values())
        # Every named parameter of the Trainer's method is still accepted by ours, and every one we name exists there.
        lost = [p for p in theirs if p not in ours and not takes_any and theirs[p].kind is not theirs[p].VAR_KEYWORD]
        extra = [
            p
            for p in ours
            if p not in theirs
            and ours[p].kind not in (ours[p].VAR_POSITIONAL, ours[p].VAR_KEYWORD)
            and not any(q.kind == q.VAR_KEYWORD for q in theirs.values())
            and name != "__init__"
        ]
        if lost or extra:
            changed.append(f"{name}: transformers takes {list(theirs)}, ours {list(ours)}")
    assert not missing, f"transformers' Trainer has no {missing}: our overrides of them are never called"
    assert not changed, changed


def test_our_helpers_do_not_shadow_a_trainer_method():
    """A transformers release that adds a method named like one of our helpers would turn the helper into an
    accidental override of it."""
    for name in OWN_HELPERS:
        assert name in vars(MedVisTrainer) and not hasattr(Trainer, name), name


def test_the_accelerate_method_wrapped_for_cpu_launches_keeps_its_name_and_parameters():
    """``use_gloo_without_accelerators`` wraps accelerate's private ``PartialState._prepare_backend`` (no public switch
    keeps DeepSpeed on CPU; training/distributed.py says why): a rename or a new signature fails here, by name."""
    from accelerate.state import PartialState

    method = getattr(PartialState, "_prepare_backend", None)
    assert method is not None, "accelerate's PartialState has no _prepare_backend: the CPU gloo fallback is never used"
    assert list(inspect.signature(method).parameters) == ["self", "cpu", "sagemaker_dp", "backend"]
