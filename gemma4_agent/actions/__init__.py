"""The action language: config/actions.yaml -> pydantic models, JSON schema and an xgrammar grammar;
grammar-constrained token selection; a defensive parser; safety limits.

    spec = load_action_spec()                      # default: the package's config/actions.yaml
    sel = GrammarSelector(spec, tokenizer, vocab_size=model_vocab)   # engine: TokenSelector
    parser = ActionParser(spec)                    # agent: text -> ParseResult (never raises)
    safety = SafetyFilter(spec.safety)             # agent: clamp, acceleration limit, watchdog
    twist = safety.step(action_to_twist(result.action, spec), now_s, valid=result.ok).twist

The grammar selector (xgrammar, torch) is imported lazily, so parsing and safety stay light.
"""
from __future__ import annotations

from typing import Any

from .parser import ActionParser, ParseResult, ParseStats, parse_action
from .safety import (SafetyFilter, SafetyOutput, action_to_twist, apply_watchdog, clamp_twist, ramp, rate_limit,
                     watchdog_expired, zero_twist)
from .spec import ActionSpec, SafetyLimits, SpecError, default_actions_path, load_action_spec

__all__ = ["ActionSpec", "SafetyLimits", "SpecError", "default_actions_path", "load_action_spec",
           "ActionParser", "ParseResult", "ParseStats", "parse_action",
           "SafetyFilter", "SafetyOutput", "action_to_twist", "apply_watchdog", "clamp_twist", "ramp", "rate_limit",
           "watchdog_expired", "zero_twist",
           "GrammarSelector", "GreedySelector", "TokenSelector", "run_decode_loop"]

_LAZY = {"GrammarSelector": ".grammar", "GreedySelector": ".selectors", "TokenSelector": ".selectors",
         "run_decode_loop": ".selectors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
