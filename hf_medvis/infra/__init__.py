"""Infrastructure checks that stand apart from training code (never imports hf_medvis.training/data/models):
``nccl`` (collectives check), ``env`` (environment report), ``sizing`` (per-GPU memory and Azure SKUs), ``jsonlog`` and
``logsearch`` (per-rank structured logs), with reference data in ``data/*.yaml``."""
