"""Each named Gluon int4 GEMM form launched twice at a 280-token frame's 286 rows on one 12B shape (the first launch
compiles), for Nsight Compute to profile the second:

    ncu --clock-control none --kernel-name regex:q4_gemm --launch-skip 1 --launch-count 1 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats python3 benchmarks/gluon_ncu_launch.py gate_up FORM

FORM: BLOCK_M,BLOCK_N,STAGES,SUB,TAIL,SPLIT for q4_gemm (shared-memory operand), or wb:BLOCK_N,STAGES for
q4_gemm_wb. One form a process, so that --launch-skip 1 skips its compile."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_decode_kernels import SHAPES, int4_copies  # noqa: E402
from gemma4_agent.quant import gluon_q4  # noqa: E402


def main() -> int:
    shape, form = sys.argv[1], sys.argv[2]
    out, inp = {name: (o, i) for name, o, i in SHAPES}[shape]
    mod = int4_copies(out, inp, 1)[0]
    x = torch.randn(286, inp, device="cuda", dtype=torch.bfloat16)
    if form.startswith("wb:"):
        block_n, stages = map(int, form[3:].split(","))
        run = lambda: gluon_q4.q4_gemm_wb(x, mod.qweight, mod.scales, block_n, stages)  # noqa: E731
    else:
        config = tuple(map(int, form.split(",")))
        run = lambda: gluon_q4.q4_gemm(x, mod.qweight, mod.scales, *config, smem_operand=True)  # noqa: E731
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
