"""The action vocabulary (config/actions.yaml): validated spec, per-action pydantic models, JSON schema,
the xgrammar EBNF grammar and the canonical text of an action.

Everything is generated from the YAML: an action or a field added there needs no code change.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model, field_validator, model_validator

from ..errors import one_line

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
ENUM_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
TWIST_FIELDS = ("linear_x", "angular_z")
MAX_DECIMALS = 6
RESERVED = {"action"}


class SpecError(ValueError):
    """The action file is invalid (message names the offending entry)."""


# --------------------------------------------------------------------------------------------------
# The YAML, as pydantic models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldSpec(_Strict):
    type: Literal["number", "integer", "enum"] = "number"
    unit: str = ""
    description: str = ""
    min: Optional[float] = None
    max: Optional[float] = None
    decimals: Optional[int] = Field(default=None, ge=0, le=MAX_DECIMALS)
    values: Optional[List[str]] = None

    @model_validator(mode="after")
    def _check(self) -> "FieldSpec":
        if self.type in ("number", "integer"):
            if self.min is None or self.max is None:
                raise ValueError(f"a {self.type} field needs min and max")
            if not (math.isfinite(self.min) and math.isfinite(self.max)):
                raise ValueError("min and max must be finite")
            if self.min > self.max:
                raise ValueError(f"min {self.min} > max {self.max}")
            if self.values is not None:
                raise ValueError("values is only for enum fields")
            if self.type == "integer" and self.decimals not in (None, 0):
                raise ValueError("an integer field has no decimals")
        else:
            if not self.values:
                raise ValueError("an enum field needs a non-empty list of values")
            for v in self.values:
                if not ENUM_RE.match(v):
                    raise ValueError(f"enum value {v!r} must match {ENUM_RE.pattern}")
            if len(set(self.values)) != len(self.values):
                raise ValueError("enum values must be unique")
            if self.min is not None or self.max is not None or self.decimals is not None:
                raise ValueError("an enum field has no min/max/decimals")
        return self


class TwistFromField(_Strict):
    field: str
    scale: float = 1.0


TwistValue = Union[float, str, TwistFromField]


class ActionDef(_Strict):
    description: str = ""
    fields: Dict[str, FieldSpec] = Field(default_factory=dict)
    twist: Dict[str, TwistValue] = Field(default_factory=dict)

    @field_validator("fields", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _check(self) -> "ActionDef":
        for name in self.fields:
            if not NAME_RE.match(name) or name in RESERVED:
                raise ValueError(f"field name {name!r} must match {NAME_RE.pattern} and not be 'action'")
        for key, value in self.twist.items():
            if key not in TWIST_FIELDS:
                raise ValueError(f"twist key {key!r} is not one of {TWIST_FIELDS}")
            ref = value.field if isinstance(value, TwistFromField) else value if isinstance(value, str) else None
            if ref is not None:
                if ref not in self.fields:
                    raise ValueError(f"twist {key} refers to unknown field {ref!r}")
                if self.fields[ref].type == "enum":
                    raise ValueError(f"twist {key} refers to enum field {ref!r}")
            elif isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"twist {key} must be finite")
        return self


class SafetyLimits(_Strict):
    max_linear_x: float = Field(0.5, gt=0)
    max_angular_z: float = Field(1.0, gt=0)
    max_linear_accel: float = Field(0.5, gt=0)
    max_angular_accel: float = Field(2.0, gt=0)
    max_linear_decel: Optional[float] = Field(None, gt=0)   # None: same as accel
    max_angular_decel: Optional[float] = Field(None, gt=0)
    command_timeout_s: float = Field(1.0, gt=0)

    @property
    def linear_decel(self) -> float:
        return self.max_linear_decel if self.max_linear_decel is not None else self.max_linear_accel

    @property
    def angular_decel(self) -> float:
        return self.max_angular_decel if self.max_angular_decel is not None else self.max_angular_accel


class ActionFile(_Strict):
    version: int = 1
    decimals: int = Field(2, ge=0, le=MAX_DECIMALS)
    fallback: Literal["stop", "hold_last"] = "stop"
    stop_action: str = "stop"
    actions: Dict[str, ActionDef]
    safety: SafetyLimits = Field(default_factory=SafetyLimits)

    @model_validator(mode="after")
    def _check(self) -> "ActionFile":
        if not self.actions:
            raise ValueError("no actions")
        for name in self.actions:
            if not NAME_RE.match(name):
                raise ValueError(f"action name {name!r} must match {NAME_RE.pattern}")
        stop = self.actions.get(self.stop_action)
        if stop is None:
            raise ValueError(f"stop_action {self.stop_action!r} is not an action")
        if stop.fields:
            raise ValueError(f"stop_action {self.stop_action!r} must have no fields")
        return self


# --------------------------------------------------------------------------------------------------
# Number grid: a number with d decimals is an integer count of 10^-d units.


def _to_units(value: float, decimals: int, rounding: str, what: str) -> int:
    scaled = Decimal(repr(float(value))) * (Decimal(10) ** decimals)
    units = int(scaled.to_integral_value(rounding=rounding))
    if scaled != units:
        raise SpecError(f"{what} = {value} has more than {decimals} decimals")
    return units


def _digit_classes(lo: str, hi: str) -> List[List[Tuple[str, str]]]:
    """Sequences of digit ranges covering the equal-width digit strings lo..hi (inclusive)."""
    if not lo:
        return [[]]
    a, b = lo[0], hi[0]
    rest = len(lo) - 1
    if a == b:
        return [[(a, a)] + seq for seq in _digit_classes(lo[1:], hi[1:])]
    out: List[List[Tuple[str, str]]] = []
    lo_full = lo[1:] == "0" * rest
    hi_full = hi[1:] == "9" * rest
    first = a if lo_full else chr(ord(a) + 1)
    last = b if hi_full else chr(ord(b) - 1)
    if not lo_full:
        out += [[(a, a)] + seq for seq in _digit_classes(lo[1:], "9" * rest)]
    if first <= last:
        out.append([(first, last)] + [("0", "9")] * rest)
    if not hi_full:
        out += [[(b, b)] + seq for seq in _digit_classes("0" * rest, hi[1:])]
    return out


def _ebnf_class(c: Tuple[str, str]) -> str:
    return f'"{c[0]}"' if c[0] == c[1] else f"[{c[0]}-{c[1]}]"


def _unsigned_alternatives(lo: int, hi: int, decimals: int) -> List[str]:
    """EBNF sequences spelling exactly the numbers lo..hi (units, lo >= 0) as INT[.FRAC], FRAC of
    `decimals` digits, INT without leading zeros."""
    alts: List[str] = []
    scale = 10 ** decimals
    int_len = 1
    while True:
        start = 0 if int_len == 1 else 10 ** (int_len - 1) * scale
        end = 10 ** int_len * scale - 1
        if start > hi:
            break
        a, b = max(lo, start), min(hi, end)
        if a <= b:
            width = int_len + decimals
            for seq in _digit_classes(str(a).zfill(width), str(b).zfill(width)):
                parts = [_ebnf_class(c) for c in seq]
                if decimals:
                    parts.insert(int_len, '"."')
                alts.append(" ".join(parts))
        int_len += 1
    return alts


def number_alternatives(lo: int, hi: int, decimals: int) -> List[str]:
    """EBNF alternatives for every number lo..hi (in units of 10^-decimals); "-" only below zero."""
    alts: List[str] = []
    if lo < 0:
        neg_hi = min(hi, -1)
        alts += ['"-" ' + s for s in _unsigned_alternatives(-neg_hi, -lo, decimals)]
    if hi >= 0:
        alts += _unsigned_alternatives(max(lo, 0), hi, decimals)
    return alts


def format_units(units: int, decimals: int) -> str:
    sign = "-" if units < 0 else ""
    units = abs(units)
    if decimals == 0:
        return f"{sign}{units}"
    scale = 10 ** decimals
    return f"{sign}{units // scale}.{units % scale:0{decimals}d}"


def _ebnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------------------------------
# The runtime spec


class FieldInfo:
    """One field, resolved: its decimals and its range in units."""

    def __init__(self, action: str, name: str, spec: FieldSpec, default_decimals: int):
        self.action, self.name, self.spec = action, name, spec
        self.type = spec.type
        if spec.type == "enum":
            self.decimals, self.lo, self.hi = 0, 0, 0
            return
        self.decimals = 0 if spec.type == "integer" else (
            spec.decimals if spec.decimals is not None else default_decimals)
        what = f"actions.{action}.fields.{name}"
        self.lo = _to_units(spec.min, self.decimals, ROUND_CEILING, what + ".min")
        self.hi = _to_units(spec.max, self.decimals, ROUND_FLOOR, what + ".max")

    @property
    def min(self) -> float:
        return self.lo / 10 ** self.decimals

    @property
    def max(self) -> float:
        return self.hi / 10 ** self.decimals

    def units(self, value: float) -> int:
        """Nearest grid point, clamped into the range."""
        q = Decimal(repr(float(value))) * (Decimal(10) ** self.decimals)
        u = int(q.to_integral_value(rounding=ROUND_HALF_EVEN))
        return min(max(u, self.lo), self.hi)

    def quantize(self, value: Any) -> Any:
        if self.type == "enum":
            return value
        u = self.units(value)
        return u if self.type == "integer" else u / 10 ** self.decimals

    def text(self, value: Any) -> str:
        if self.type == "enum":
            return json.dumps(value)
        return format_units(self.units(value), self.decimals)

    def ebnf(self) -> str:
        if self.type == "enum":
            return " | ".join(_ebnf_literal(json.dumps(v)) for v in self.spec.values)
        return " | ".join(f"({a})" for a in number_alternatives(self.lo, self.hi, self.decimals))

    def annotation(self) -> Any:
        extra = {"unit": self.spec.unit} if self.spec.unit else {}
        desc = self.spec.description or None
        if self.type == "enum":
            return Annotated[Literal[tuple(self.spec.values)], Field(description=desc)]  # type: ignore[misc]
        if self.type == "integer":
            return Annotated[int, Field(ge=self.lo, le=self.hi, description=desc, json_schema_extra=extra or None)]
        extra = dict(extra, decimals=self.decimals)
        return Annotated[float, Field(ge=self.min, le=self.max, allow_inf_nan=False, description=desc,
                                      json_schema_extra=extra)]


class ActionSpec:
    """The loaded action vocabulary. Build with `load_action_spec(path)` or `ActionSpec.from_dict(d)`."""

    def __init__(self, file: ActionFile, source: Optional[str] = None):
        self.file = file
        self.source = source
        self.decimals = file.decimals
        self.fallback = file.fallback
        self.stop_action_name = file.stop_action
        self.safety: SafetyLimits = file.safety
        self.actions: Dict[str, ActionDef] = dict(file.actions)
        self.fields: Dict[str, Dict[str, FieldInfo]] = {
            a: {f: FieldInfo(a, f, fs, file.decimals) for f, fs in d.fields.items()} for a, d in self.actions.items()}
        self.models: Dict[str, type] = {a: self._model(a) for a in self.actions}
        models = tuple(self.models.values())
        if len(models) == 1:
            self.adapter: TypeAdapter = TypeAdapter(models[0])
        else:
            self.adapter = TypeAdapter(Annotated[Union[models], Field(discriminator="action")])  # type: ignore[valid-type]
        canonical = json.dumps(file.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        self.fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: Optional[str] = None) -> "ActionSpec":
        try:
            file = ActionFile.model_validate(data)
        except Exception as exc:  # pydantic.ValidationError or a bad type
            raise SpecError(f"invalid action spec{' ' + source if source else ''}: {one_line(exc)}") from exc
        return cls(file, source)

    def _model(self, action: str) -> type:
        fields: Dict[str, Any] = {"action": (Literal[action], ...)}  # type: ignore[valid-type]
        for name, info in self.fields[action].items():
            fields[name] = (info.annotation(), ...)
        model_name = "Action" + "".join(p.capitalize() for p in action.split("_"))
        return create_model(model_name, __config__=ConfigDict(extra="forbid", strict=True),
                            __doc__=self.actions[action].description or None, **fields)

    # queries --------------------------------------------------------------------------------------
    @property
    def action_names(self) -> List[str]:
        return list(self.actions)

    def stop_action(self) -> Dict[str, Any]:
        return {"action": self.stop_action_name}

    def json_schema(self) -> Dict[str, Any]:
        return self.adapter.json_schema()

    def validate(self, obj: Any) -> Dict[str, Any]:
        """A python object -> the validated action dict, numbers on the grid. Raises
        pydantic.ValidationError (or ValueError) if invalid."""
        model = self.adapter.validate_python(obj, strict=True)
        data = model.model_dump()
        fields = self.fields[data["action"]]
        out: Dict[str, Any] = {"action": data["action"]}
        for name, info in fields.items():
            out[name] = info.quantize(data[name])
        return out

    def format_action(self, action: Dict[str, Any]) -> str:
        """The canonical text of a valid action, exactly what the grammar produces (use it for
        training targets and prompts). Raises if the action is invalid."""
        act = self.validate(action)
        parts = ['{"action":' + json.dumps(act["action"])]
        for name, info in self.fields[act["action"]].items():
            parts.append(f'"{name}":{info.text(act[name])}')
        return ",".join(parts) + "}"

    def longest_text(self) -> int:
        """Characters in the longest action text the grammar allows: a bound on its tokens (each spells at least
        one), so a decode cap of this and the end token never cuts an action short."""
        def widest(info: FieldInfo) -> int:
            if info.type == "enum":
                return max(len(json.dumps(v)) for v in info.spec.values)
            return max(len(format_units(u, info.decimals)) for u in (info.lo, info.hi))  # widest at an end

        return max(len('{"action":}') + len(json.dumps(a)) + sum(len(f',"{f}":') + widest(info)
                                                                 for f, info in self.fields[a].items())
                   for a in self.actions)

    def ebnf(self) -> str:
        """The xgrammar EBNF grammar of one action text (no whitespace, fixed key order)."""
        names = list(self.actions)
        lines = ['root ::= "{\\"action\\":" (' + " | ".join(f"act_{a}" for a in names) + ') "}"']
        for a in names:
            seq = [_ebnf_literal(json.dumps(a))]
            for f in self.fields[a]:
                seq += [_ebnf_literal(f',"{f}":'), f"fld_{a}_{f}"]
            lines.append(f"act_{a} ::= " + " ".join(seq))
        for a in names:
            for f, info in self.fields[a].items():
                lines.append(f"fld_{a}_{f} ::= {info.ebnf()}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """A short human-readable description of the vocabulary, e.g. for the system prompt."""
        lines = []
        for a, d in self.actions.items():
            fs = self.fields[a]
            example = {"action": a}
            for f, info in fs.items():
                example[f] = info.spec.values[0] if info.type == "enum" else info.quantize((info.min + info.max) / 2)
            ranges = ", ".join(
                f"{f} in {info.spec.values}" if info.type == "enum" else
                f"{f} in [{format_units(info.lo, info.decimals)}, {format_units(info.hi, info.decimals)}]"
                + (f" {info.spec.unit}" if info.spec.unit else "") for f, info in fs.items())
            lines.append(f"{self.format_action(example)}  -- {d.description}" + (f"; {ranges}" if ranges else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Loading

_PACKAGE = "gemma4_agent"
_REL = os.path.join("config", "actions.yaml")


def default_actions_path() -> Path:
    """config/actions.yaml: next to the package source (a checkout), else the installed share/ copy
    (ament_index, AMENT_PREFIX_PATH, sys.prefix)."""
    here = Path(__file__).resolve().parents[2] / _REL
    if here.is_file():
        return here
    candidates: List[Path] = []
    try:
        from ament_index_python.packages import get_package_share_directory  # type: ignore

        candidates.append(Path(get_package_share_directory(_PACKAGE)) / _REL)
    except Exception:
        pass
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / _PACKAGE / _REL)
    candidates.append(Path(sys.prefix) / "share" / _PACKAGE / _REL)
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no {_REL} found next to the package ({here}) nor under share/{_PACKAGE}")


_CACHE: Dict[Tuple[str, float], ActionSpec] = {}


def load_action_spec(path: Union[str, Path, None] = None) -> ActionSpec:
    """Load and validate an action file (default: the package's config/actions.yaml). Cached per path
    and modification time. Raises SpecError / FileNotFoundError."""
    p = Path(path) if path is not None else default_actions_path()
    p = p.resolve()
    if not p.is_file():
        raise FileNotFoundError(f"action file not found: {p} (give an actions.yaml; see config/actions.yaml)")
    key = (str(p), p.stat().st_mtime)
    spec = _CACHE.get(key)
    if spec is None:
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SpecError(f"{p}: not valid YAML: {one_line(exc)}") from exc
        spec = ActionSpec.from_dict(data, source=str(p))
        _CACHE[key] = spec
    return spec
