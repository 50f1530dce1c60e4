"""Which of several interchangeable CUDA implementations is fastest on the GPU at hand, for a given shape.

Timed once per key on first use, with L2 flushed before every run (`triton.testing.do_bench`), and remembered
for the process, as Triton's autotuner remembers a kernel's best configuration per key. Each candidate's time is
the lower of two medians, the candidates taking turns: a mean over one stretch of a shared GPU picked the slower
GEMV for two of a layer's projections in one of two 12B runs (2026-11-29). Used where the winner
depends on the shape and the GPU and was measured to change between them (int4 chunk matmuls, attention over
the cache): the choice can only be as slow as the faster candidate, on any GPU.
"""
from __future__ import annotations

from typing import Callable, Hashable


class FastestOf:
    def __init__(self) -> None:
        self.picks: dict[Hashable, str] = {}

    def __call__(self, key: Hashable, candidates: dict[str, Callable[[], object]]) -> str:
        """The name of the fastest candidate (name -> zero-argument call) for `key`. The first use of a key runs
        each candidate once untimed (its kernels compile and autotune then), then times it."""
        if key not in self.picks:
            import triton.testing

            for run in candidates.values():
                run()
            times = {name: float("inf") for name in candidates}
            for _ in range(2):
                for name, run in candidates.items():
                    t = triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")
                    times[name] = min(times[name], t)
            self.picks[key] = min(times, key=times.get)
        return self.picks[key]

    def run(self, key: Hashable, candidates: dict[str, Callable[[], object]], name: str | None = None) -> object:
        """Call the fastest candidate for `key` (timed on first use; a lone candidate is not timed), or the one
        `name`d, and return what it returns."""
        if name is None and len(candidates) == 1:
            name = next(iter(candidates))
        return candidates[name or self(key, candidates)]()
