"""Which of several interchangeable CUDA implementations is fastest on the GPU at hand, for a given shape.

Timed once per key on first use and remembered for the process, as Triton's autotuner remembers a kernel's best
configuration per key. Used where the winner depends on the shape and the GPU and was measured to change between
them (int4 chunk matmuls, attention over the cache, the one-row GEMVs): the choice can only be as slow as the
faster candidate, on any GPU.

Timed by `kernel_ms`: the GPU's time for the candidate alone, from HBM (L2 flushed before every run, as a decode
step meets its weights), and without the host's cost of launching it. `triton.testing.do_bench` starts its clock
when the flush ends, so a candidate whose Python launch outlasted the flush was charged for it: on the lent H200
the int8-x GEMV (the more arguments) lost to the float one on shapes where it is 1.1-1.7x faster, and which one won
changed from run to run with the host's load (2026-11-29 profiles).
"""
from __future__ import annotations

import statistics
from typing import Callable, Hashable

FLUSH_BYTES = 256 << 20  # more than any L2 (H100/H200: 50 MB)
# ~0.5 ms of GPU time for the host to launch the candidate before its clock starts: a launch through Python took
# 50-107 us on the lent H200 (2026-11-29), and a loaded host takes longer
HOST_SLACK_CYCLES = 1_000_000


def kernel_ms(fn: Callable[[], object], reps: int = 40) -> float:
    """Median GPU time of fn's kernels (already compiled), in ms, each run after an L2 flush and a pause that lets
    Python finish launching fn before the run's start event is reached."""
    import torch

    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    pause = getattr(torch.cuda, "_sleep", lambda cycles: None)  # private in torch; without it, timings include launches
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        pause(HOST_SLACK_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


class FastestOf:
    def __init__(self) -> None:
        self.picks: dict[Hashable, str] = {}

    def __call__(self, key: Hashable, candidates: dict[str, Callable[[], object]]) -> str:
        """The name of the fastest candidate (name -> zero-argument call) for `key`. The first use of a key runs
        each candidate once untimed (its kernels compile and autotune then), then times them twice in turns
        and keeps each one's lower median (a burst of other work on a shared GPU hits one turn)."""
        if key not in self.picks:
            for run in candidates.values():
                run()
            times = {name: float("inf") for name in candidates}
            for _ in range(2):
                for name, run in candidates.items():
                    times[name] = min(times[name], kernel_ms(run))
            self.picks[key] = min(times, key=times.get)
        return self.picks[key]

    def run(self, key: Hashable, candidates: dict[str, Callable[[], object]], name: str | None = None) -> object:
        """Call the fastest candidate for `key` (timed on first use; a lone candidate is not timed), or the one
        `name`d, and return what it returns."""
        if name is None and len(candidates) == 1:
            name = next(iter(candidates))
        return candidates[name or self(key, candidates)]()
