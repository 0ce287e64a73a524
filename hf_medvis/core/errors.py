"""An exception -> one line of text, for the one-line errors of the recipes and the ``hf-medvis`` command."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of the exception's message (its type name if it has none): where the rest is a traceback-like
    elaboration (transformers' and the Hub's OSErrors, YAML parse errors, a failed collective)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(err: BaseException) -> str:
    """The whole message on one line (its type name if it has none); a pydantic ValidationError (DeepSpeed's config
    checks) becomes ``field: problem (N validation error for Model)`` without pydantic's type tag and help link."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # pydantic: "1 validation error for DeepSpeedZeroConfig / stage / Input should be 0, 1, 2 or 3 [type=...]"
    if type(err).__name__ == "ValidationError" and len(lines) >= 3:
        return f"{lines[1]}: {lines[2].split(' [type=')[0]} ({lines[0]})"
    return " ".join(" ".join(lines).split()) or type(err).__name__


def first_sentence(err: BaseException, limit: int = 200) -> str:
    """The message's first sentence on one line, at most ``limit`` characters: for a cause quoted inside our own
    sentence (an SDK error whose later sentences are request ids and help text)."""
    return one_line(err).split(". ", 1)[0].rstrip(".")[:limit]
