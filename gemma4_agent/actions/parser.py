"""Defensive parser: any text -> a validated action, or the configured fallback with a reason code.

It never raises into the caller: every failure becomes `ParseResult(ok=False, action=<fallback>,
error=<message>, reason=<code>)`, counted in `ParseStats` and logged.

Reason codes: not_text, empty, too_long, not_json, truncated, duplicate_key, non_finite, not_object,
missing_action, unknown_action, missing_key, extra_key, wrong_type, out_of_range, invalid, internal.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .spec import ActionSpec, load_action_spec

log = logging.getLogger("gemma4_agent.actions")

MAX_TEXT_CHARS = 4096  # a valid action is ~60 characters; anything longer is not one

_PYDANTIC_REASONS = {
    "missing": "missing_key",
    "extra_forbidden": "extra_key",
    "union_tag_invalid": "unknown_action",
    "union_tag_not_found": "missing_action",
    "literal_error": "wrong_type",
    "finite_number": "non_finite",
    "less_than_equal": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "greater_than": "out_of_range",
}


@dataclass
class ParseResult:
    ok: bool
    action: Dict[str, Any]
    error: Optional[str] = None
    reason: Optional[str] = None


@dataclass
class ParseStats:
    """Counts of parse outcomes (per parser; no globals)."""
    total: int = 0
    ok: int = 0
    reasons: Counter = field(default_factory=Counter)

    def record(self, result: ParseResult) -> None:
        self.total += 1
        if result.ok:
            self.ok += 1
        else:
            self.reasons[result.reason or "invalid"] += 1

    @property
    def failed(self) -> int:
        return self.total - self.ok

    def as_dict(self) -> Dict[str, Any]:
        return {"total": self.total, "ok": self.ok, "failed": self.failed, "reasons": dict(self.reasons)}


class _Reject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _no_constant(name: str) -> Any:
    raise _Reject("non_finite", f"non-finite number {name}")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject("non_finite", f"number {text[:40]} is not finite as a double")
    return value


def _int(text: str) -> int:
    if len(text) > 40:  # far outside any range; avoids huge-int conversions
        raise _Reject("out_of_range", f"integer with {len(text)} digits")
    return int(text)


def _pairs(pairs: list) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Reject("duplicate_key", f"duplicate key {k!r}")
        out[k] = v
    return out


def _decode(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_float, parse_int=_int,
                          object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
            raise _Reject("truncated", f"truncated JSON: {exc.msg}") from None
        raise _Reject("not_json", f"not JSON: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise _Reject("not_json", "JSON nested too deeply") from None
    except ValueError as exc:  # e.g. int conversion limits
        raise _Reject("not_json", f"not JSON: {exc}") from None


def _check(obj: Any, spec: ActionSpec) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        raise _Reject("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if "action" not in obj:
        raise _Reject("missing_action", "no 'action' key")
    name = obj["action"]
    if not isinstance(name, str):
        raise _Reject("wrong_type", "'action' is not a string")
    if name not in spec.actions:
        raise _Reject("unknown_action", f"unknown action {name[:40]!r}")
    fields = spec.fields[name]
    missing = [f for f in fields if f not in obj]
    if missing:
        raise _Reject("missing_key", f"{name}: missing {missing}")
    extra = [str(k)[:40] for k in obj if k != "action" and k not in fields]
    if extra:
        raise _Reject("extra_key", f"{name}: unexpected {extra}")
    try:
        return spec.validate(obj)
    except Exception as exc:  # pydantic.ValidationError (or a conversion error)
        reason, message = "invalid", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        errors = getattr(exc, "errors", None)
        if callable(errors):
            try:
                errs = errors()
                if errs:
                    first = errs[0]
                    kind = first.get("type", "")
                    reason = _PYDANTIC_REASONS.get(kind, "wrong_type" if kind.endswith("_type") else "invalid")
                    loc = ".".join(str(p) for p in first.get("loc", ()))
                    message = f"{name}: {loc}: {first.get('msg', kind)}"
            except Exception:
                pass
        raise _Reject(reason, message) from None


class ActionParser:
    """Stateful parser: counts reasons and remembers the last valid action (for `hold_last`)."""

    def __init__(self, spec: Optional[ActionSpec] = None, fallback: Optional[str] = None,
                 logger: Optional[logging.Logger] = None):
        self.spec = spec if spec is not None else load_action_spec()
        self.fallback = fallback or self.spec.fallback
        if self.fallback not in ("stop", "hold_last"):
            raise ValueError(f"fallback must be 'stop' or 'hold_last', not {self.fallback!r}")
        self.stats = ParseStats()
        self.last_valid: Optional[Dict[str, Any]] = None
        self.log = logger or log

    def reset(self) -> None:
        self.last_valid = None

    def fallback_action(self) -> Dict[str, Any]:
        if self.fallback == "hold_last" and self.last_valid is not None:
            return dict(self.last_valid)
        return self.spec.stop_action()

    def parse(self, text: Any) -> ParseResult:
        result = parse_action(text, self.spec, fallback=self.fallback, last_valid=self.last_valid)
        if result.ok:
            self.last_valid = dict(result.action)
        self.stats.record(result)
        if not result.ok:
            first = self.stats.reasons[result.reason] == 1
            (self.log.warning if first else self.log.debug)(
                "invalid action (%s): %s -> fallback %s", result.reason, result.error, result.action)
        return result


def parse_action(text: Any, spec: Optional[ActionSpec] = None, *, fallback: Optional[str] = None,
                 last_valid: Optional[Dict[str, Any]] = None, stats: Optional[ParseStats] = None) -> ParseResult:
    """Parse one action text. Never raises; an invalid text gives ok=False and the fallback action
    (`stop`, or with fallback='hold_last' the given `last_valid`)."""
    try:
        if spec is None:
            spec = load_action_spec()
        policy = fallback or spec.fallback
        try:
            if isinstance(text, (bytes, bytearray)):
                text = bytes(text).decode("utf-8", errors="replace")
            if not isinstance(text, str):
                raise _Reject("not_text", f"expected text, got {type(text).__name__}")
            stripped = text.strip()
            if not stripped:
                raise _Reject("empty", "empty text")
            if len(stripped) > MAX_TEXT_CHARS:
                raise _Reject("too_long", f"{len(stripped)} characters (max {MAX_TEXT_CHARS})")
            result = ParseResult(True, _check(_decode(stripped), spec))
        except _Reject as rej:
            if policy == "hold_last" and last_valid is not None:
                action = dict(last_valid)
            else:
                action = spec.stop_action()
            result = ParseResult(False, action, str(rej), rej.reason)
    except Exception as exc:  # never raise into the caller
        stop = {"action": getattr(spec, "stop_action_name", "stop")}
        result = ParseResult(False, stop, f"internal error: {type(exc).__name__}: {exc}", "internal")
    if stats is not None:
        stats.record(result)
    return result
