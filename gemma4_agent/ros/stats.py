"""Counters and latency windows the node reports on /diagnostics. Thread-safe, no ROS import."""
from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Deque, Dict, List, Tuple

import numpy as np

from gemma4_agent.ros.image_convert import BAD_IMAGE_KINDS

WINDOW = 200          # latency percentiles are over the last WINDOW processed frames
PERCENTILES = (50, 90, 99)
COUNTERS = (
    "frames_received",    # messages that reached the subscription while active
    "frames_processed",   # frames the agent acted on (ok or fallback)
    "commands_ok",        # valid actions published
    "fallbacks",          # fallback (stop) published: invalid output, error or deadline
    "deadline_misses",    # command published later than budget_ms after the frame's stamp
    "dropped_replaced",   # a newer frame arrived before the worker took this one
    "dropped_stale",      # older than budget_ms when the worker took it
    "dropped_inactive",   # pending when the node was deactivated
    "bad_images",         # could not be converted (by kind below) or rejected by the agent
    "watchdog_stops",     # zero Twists published by the watchdog
)


class NodeStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._bad_by_kind: Counter = Counter()
        self._latency: Dict[str, Deque[float]] = {}

    def count(self, name: str, n: int = 1) -> None:
        assert name in COUNTERS, name
        with self._lock:
            self._counts[name] += n

    def bad_image(self, kind: str) -> int:
        """Count a bad image of `kind`; returns how many of that kind so far (1 = first)."""
        with self._lock:
            self._counts["bad_images"] += 1
            self._bad_by_kind[kind] += 1
            return self._bad_by_kind[kind]

    def latency(self, stage: str, ms: float) -> None:
        with self._lock:
            self._latency.setdefault(stage, deque(maxlen=WINDOW)).append(float(ms))

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> Tuple[Dict[str, int], Dict[str, int], Dict[str, Dict[int, float]]]:
        """(counters, bad images by kind, {stage: {percentile: ms}})."""
        with self._lock:
            counts = {name: self._counts[name] for name in COUNTERS}
            bad = {kind: self._bad_by_kind[kind] for kind in (*BAD_IMAGE_KINDS, *sorted(
                set(self._bad_by_kind) - set(BAD_IMAGE_KINDS)))}
            windows = {stage: list(values) for stage, values in self._latency.items()}
        pct = {stage: dict(zip(PERCENTILES, np.percentile(values, PERCENTILES).tolist()))
               for stage, values in windows.items() if values}
        return counts, bad, pct

    def key_values(self) -> List[Tuple[str, str]]:
        """Flat (key, value) pairs, the order a diagnostics viewer shows them in."""
        counts, bad, pct = self.snapshot()
        pairs = [(name, str(value)) for name, value in counts.items()]
        pairs += [(f"bad_images.{kind}", str(n)) for kind, n in bad.items()]
        for stage, values in sorted(pct.items()):
            pairs += [(f"latency_ms.{stage}.p{p}", f"{ms:.1f}") for p, ms in values.items()]
        return pairs
