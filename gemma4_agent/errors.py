"""One-line messages for errors a user can cause (a malformed config, YAML or JSON; a wrong value).

The CLI prints them after `error:`, the node logs them and puts them on /diagnostics: a user reads
one line naming the field and the problem, not pydantic's multi-line report or a parser's excerpt.
"""
from __future__ import annotations

from pydantic import ValidationError


def one_line(err: BaseException) -> str:
    """`err` as one line. A pydantic ValidationError: `Model: field.path: problem (got value)` per error,
    joined by '; '. A YAML error with a position: `line L, column C: problem`. Anything else: its text
    with the line breaks folded."""
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors(include_url=False):
            where = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            got = f" (got {given!r})" if e["type"] != "missing" and not isinstance(given, (dict, list)) else ""
            parts.append(f"{where + ': ' if where else ''}{msg}{got}")
        return f"{err.title}: " + "; ".join(parts)
    mark = getattr(err, "problem_mark", None)  # yaml.MarkedYAMLError, without importing yaml here
    if mark is not None and getattr(err, "problem", None):
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    return " ".join(str(err).split()) or type(err).__name__
