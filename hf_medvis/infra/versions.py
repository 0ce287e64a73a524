"""Version comparisons shared by the environment report (env.py) and the ACPT image checks (acpt.py)."""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version


def base_version(text: str) -> Version | None:
    """``"2.14.1+cu130"`` -> 2.14.1 (local tags do not change compatibility); None when ``text`` is no version."""
    try:
        return Version(Version(str(text)).base_version)
    except InvalidVersion:
        return None


def satisfies(version: str | None, spec: str) -> bool:
    """Whether ``version`` (None: not installed / not documented) meets the specifier ``spec``."""
    parsed = base_version(version) if version else None
    return parsed is not None and SpecifierSet(spec).contains(parsed, prereleases=True)
