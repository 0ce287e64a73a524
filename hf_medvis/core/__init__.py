"""Shared foundations every wing may import (data, models, training, evaluation, infra): launcher variables, task names,
architecture presets, parameter counts, exceptions as one line. Standard library only, and imports no other part of
hf_medvis, so that importing it costs nothing (``hf-medvis --help``, infra on a bare node)."""
