"""Next-token selectors (the engine <-> actions contract of docs/ARCHITECTURE.md) and the greedy one.

Decode loop (engine):
    prefill -> logits
    loop: t = select(logits); accept(t); if done(): break
          f = forced();        if done(): break
          logits = model(chunk=[t] + f)          # one decode step
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenSelector(Protocol):
    def reset(self) -> None: ...                        # new action: grammar back to its start
    def select(self, logits: torch.Tensor) -> int: ...  # logits: 1-D [vocab] float (CPU or CUDA)
    def accept(self, token: int) -> None: ...           # advance the state with a chosen token
    def forced(self) -> List[int]: ...                  # forced tokens, already accepted; [] if none
    def done(self) -> bool: ...                         # the action is complete: stop decoding


class GreedySelector:
    """Argmax; done after a token of `eos_ids` or `max_tokens` accepted tokens. Never forces."""

    def __init__(self, eos_ids: Iterable[int] = (), max_tokens: int = 64):
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.max_tokens = int(max_tokens)
        self.tokens: List[int] = []
        self.free_tokens = 0
        self.forced_tokens = 0
        self.total_free = 0

    def reset(self) -> None:
        self.tokens = []
        self.free_tokens = 0

    def select(self, logits: torch.Tensor) -> int:
        self.free_tokens += 1
        self.total_free += 1
        return int(torch.argmax(logits.reshape(-1)))

    def choose_on_device(self, logits: torch.Tensor, out: torch.Tensor) -> None:
        """select() without reading the choice back: written into `out` (long [1], the logits' device); the engine
        launches the next step before it reads the choice (SessionConfig.decode_ahead)."""
        self.free_tokens += 1
        self.total_free += 1
        torch.argmax(logits.reshape(-1), 0, keepdim=True, out=out)

    def accept(self, token: int) -> None:
        self.tokens.append(int(token))

    def forced(self) -> List[int]:
        return []

    def done(self) -> bool:
        return bool(self.tokens) and (self.tokens[-1] in self.eos_ids or len(self.tokens) >= self.max_tokens)

    def text_tokens(self) -> List[int]:
        """The accepted tokens without a trailing eos."""
        if self.tokens and self.tokens[-1] in self.eos_ids:
            return self.tokens[:-1]
        return list(self.tokens)

    def stats(self) -> dict:
        return {"free_tokens": self.free_tokens, "forced_tokens": 0, "total_free": self.total_free,
                "total_forced": 0}


def run_decode_loop(selector: TokenSelector, first_logits: torch.Tensor, model_step,
                    max_steps: Optional[int] = None) -> tuple:
    """Reference implementation of the contract's loop (tests, benchmarks): `model_step(chunk)` gets
    the token ids to append and returns the next logits. Returns (tokens, decode_steps)."""
    tokens: List[int] = []
    logits = first_logits
    steps = 0
    while True:
        t = selector.select(logits)
        selector.accept(t)
        tokens.append(t)
        if selector.done():
            break
        f = selector.forced()
        tokens += f
        if selector.done():
            break
        if max_steps is not None and steps >= max_steps:
            break
        logits = model_step([t] + f)
        steps += 1
    return tokens, steps
