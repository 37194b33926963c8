"""Host time of one small matrix product on CUDA, with and without CUBLAS_WORKSPACE_CONFIG.

PyTorch asks deterministic runs to set CUBLAS_WORKSPACE_CONFIG=:4096:8, and versions of its source from 2022
into 2026 parse that variable with a std::regex at every cuBLAS call (parseChosenWorkspaceSize, called from
getCurrentCUDABlasHandle); the newest parses it once per process. This shows which one the installed PyTorch
does: 2.11 on an H100 parses per call (66 vs 24 us per product, 171 vs 24 per linear with bias), which is why
training.seed_everything leaves the variable unset. A MiniLM step is bound by the host on an H100, and
MuScleLoRA makes 2.4x as many products per step as plain fine-tuning (LoRA's rank-8 ones), so a per-product
cost moves its step-cost ratio. Each setting runs in its own process, since PyTorch reads the variable there.

    python benchmarks/cublas_overhead.py            # needs a CUDA GPU
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, warnings
import torch
warnings.simplefilter("ignore")  # deterministic mode without the variable warns at every product
if sys.argv[1] == "1":
    torch.use_deterministic_algorithms(True, warn_only=True)
x = torch.randn(32 * 40, 384, device="cuda")  # a MiniLM batch's tokens x hidden
w, a_t, b = torch.randn(384, 384, device="cuda"), torch.randn(8, 384, device="cuda"), torch.randn(384, device="cuda")
ops = {"mm 1280x384x384": lambda: x @ w, "addmm (linear with bias)": lambda: torch.nn.functional.linear(x, w, b),
       "mm rank 8 (LoRA)": lambda: x @ a_t.t()}
out = {}
for name, f in ops.items():
    for _ in range(50):
        f()
    torch.cuda.synchronize()
    n, t = 2000, time.perf_counter()
    for _ in range(n):
        f()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    out[name] = 1e6 * host / n
print(json.dumps({"torch": torch.__version__, **out}))
"""


def main():
    import torch

    from common import parser

    parser(__doc__).parse_args()  # --help

    if not torch.cuda.is_available():
        print("cublas_overhead.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for config in (None, ":4096:8"):
        for deterministic in ("0", "1"):
            env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
            if config:
                env["CUBLAS_WORKSPACE_CONFIG"] = config
            res = json.loads(subprocess.run([sys.executable, "-c", CHILD, deterministic], env=env, check=True,
                                            capture_output=True, text=True).stdout)
            rows.append((config or "(unset)", deterministic == "1", res))
    print(f"torch {rows[0][2]['torch']}: host microseconds per call (2,000 calls, no sync between them)")
    names = [k for k in rows[0][2] if k != "torch"]
    print(f"{'CUBLAS_WORKSPACE_CONFIG':24s} {'deterministic':14s} " + " ".join(f"{n:>26s}" for n in names))
    for config, det, res in rows:
        print(f"{config:24s} {str(det):14s} " + " ".join(f"{res[n]:26.1f}" for n in names))
    return 0


if __name__ == "__main__":
    from common import run_script

    run_script(main)  # bad input: one line and exit 2, as the other scripts
