"""Short text of long lists for one-line messages: the first few names and how many more."""

from __future__ import annotations

from collections.abc import Sequence


def short_list(names: Sequence[str], limit: int = 8, empty: str = "-") -> str:
    """``a, b, c, ... 5 more``: at most ``limit`` names; ``empty`` for none."""
    if not names:
        return empty
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")
