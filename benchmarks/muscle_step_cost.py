"""Cost of one MuScleLoRA training step vs one plain full fine-tuning step on the same batches.

Both go through the one training loop (cleantune.training.train via Defense.fit) for one epoch over the
same samples in the same order; the loop's own train time (model loading and dev evaluation excluded)
divided by the number of steps is the cost per step. MuScleLoRA's step is a LoRA+MSLR forward/backward
plus the gradient-alignment reference forward/backward (no base-weight gradients). Target: <= 2x.

    PYTHONPATH=src nice -n 10 python benchmarks/muscle_step_cost.py --steps 10 --repeats 2

`--count-ops` counts instead the operations a step sends to the backend (views included): a GPU running
MiniLM at batch 32 waits on Python and kernel launches, so this count predicts the GPU ratio on a CPU
(an H100 measured 2.10x where the count gave 2.13x). AdamW runs its multi-tensor (foreach) version there,
as it does by default on CUDA; model loading and dev evaluation cancel out of a 2N - N steps difference.

`--no-fill` turns off deterministic mode's filling of every new tensor (torch.utils.deterministic.
fill_uninitialized_memory), which a seeded GPU run leaves on: 579 of finetune's 1,061 kernel launches per step
on an H100. PyTorch's documentation says a program that reads no uninitialised memory stays deterministic
without it; this flag measures what it would save before the training loop changes.

`--no-deterministic` turns deterministic mode off altogether and unsets CUBLAS_WORKSPACE_CONFIG after each
seeding (see benchmarks/cublas_overhead.py): the step cost without them. It prints each run's mean training
loss, so the repeats (same seed) show whether the runs still agree without deterministic mode.

`--profile` runs each defense once under torch.profiler and prints, per step, the kernel launches, the host
syncs and the operators that take the most host time: where a launch-bound step goes.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import parser, positive_int, run_script

from cleantune.data import load_benchmark
from cleantune.defenses import get_defense
from cleantune.errors import UserError


def ms_per_step(defense_name: str, train, dev, batch_size: int, model: str, **options) -> tuple[float, float]:
    """Milliseconds per step and the epoch's mean training loss."""
    d = get_defense(defense_name, model=model, epochs=1, batch_size=batch_size, seed=0, **options)
    d.fit(train, dev, progress=False)
    return 1000 * d.report_.train_seconds / math.ceil(len(train) / batch_size), d.report_.history[-1]["loss"]


def _nondeterministic() -> None:
    """Every later seeding leaves deterministic mode off and CUBLAS_WORKSPACE_CONFIG unset."""
    real = torch.use_deterministic_algorithms

    def off(*args, **kwargs):
        real(False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

    torch.use_deterministic_algorithms = off


class _ForeachAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, foreach=True, **kwargs)


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(defense_name: str, bench, dev, steps: int, batch_size: int, model: str) -> float:
    counts = []
    for n in (steps, 2 * steps):
        d = get_defense(defense_name, model=model, epochs=1, batch_size=batch_size, seed=0, lr=2e-5)
        with _OpCount() as c:
            d.fit(bench.train.stratified_sample(n * batch_size, 0), dev, progress=False)
        counts.append(c.n)
    return (counts[1] - counts[0]) / steps


def profile(defense_name: str, train, dev, batch_size: int, model: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps = math.ceil(len(train) / batch_size)
    d = get_defense(defense_name, model=model, epochs=1, batch_size=batch_size, seed=0, lr=2e-5)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=acts) as prof:
        d.fit(train, dev, progress=False)
    events = prof.key_averages()
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    syncs = [e for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                                            "aten::_local_scalar_dense")]
    print(f"-- {defense_name}: {1000 * d.report_.train_seconds / steps:.1f} ms/step under the profiler, "
          f"{launches / steps:.0f} kernel launches/step, "
          + ", ".join(f"{e.key} {e.count / steps:.1f}/step {e.self_cpu_time_total / 1000 / steps:.2f} ms/step"
                      for e in syncs))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


def main():
    ap = parser(__doc__)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--repeats", type=positive_int, default=2, help="alternating runs; the fastest of each is kept")
    ap.add_argument("--with-ga", action="store_true", help="also time 'ga' (full fine-tuning + GA)")
    ap.add_argument("--count-ops", action="store_true", help="count backend operations per step (a GPU proxy)")
    ap.add_argument("--profile", action="store_true", help="profile one run of each: launches, syncs, top operators")
    ap.add_argument("--no-fill", action="store_true", help="do not fill new tensors in deterministic mode")
    ap.add_argument("--no-deterministic", action="store_true",
                    help="deterministic mode off and CUBLAS_WORKSPACE_CONFIG unset; prints each run's loss")
    args = ap.parse_args()
    if args.no_deterministic:
        _nondeterministic()
    if args.no_fill:
        torch.utils.deterministic.fill_uninitialized_memory = False
    bench = load_benchmark("sst2")
    if args.count_ops and 2 * args.steps * args.batch_size > len(bench.train):  # before the first run trains
        raise UserError(f"--count-ops trains 2 x --steps x --batch-size = {2 * args.steps * args.batch_size} samples, "
                        f"more than sst2's {len(bench.train)}")
    train = bench.train.stratified_sample(args.steps * args.batch_size, 0)
    dev = bench.dev.subset(range(200))  # 96 GA references + 104 for selection
    names = ["finetune", "muscle-lora"] + (["ga"] if args.with_ga else [])
    if args.count_ops:
        torch.optim.AdamW = _ForeachAdamW
        ops = {n: ops_per_step(n, bench, dev, args.steps, args.batch_size, args.model) for n in names}
        for n in names:
            print(f"{n:12s} {ops[n]:8.0f} ops/step")
        print(f"muscle-lora / finetune = {ops['muscle-lora'] / ops['finetune']:.2f}x in operations")
        return
    if args.profile:
        for n in names:
            profile(n, train, dev, args.batch_size, args.model)
        return
    times, losses = {n: [] for n in names}, {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            # same optimiser settings for both, so only the step's work differs
            ms, loss = ms_per_step(n, train, dev, args.batch_size, args.model, lr=2e-5)
            times[n].append(ms)
            losses[n].append(loss)
    best = {n: min(t) for n, t in times.items()}
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps per run, {args.repeats} runs each, "
          f"torch threads {torch.get_num_threads()}" + (", no fill" if args.no_fill else "")
          + (", not deterministic" if args.no_deterministic else ""))
    for n in names:
        print(f"{n:12s} {best[n]:8.1f} ms/step   (runs: {', '.join(f'{t:.0f}' for t in times[n])})"
              + (f"   losses: {', '.join(repr(x) for x in losses[n])}" if args.no_deterministic else ""))
    ratio = best["muscle-lora"] / best["finetune"]
    print(f"muscle-lora / finetune = {ratio:.2f}x  (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})")


if __name__ == "__main__":
    run_script(main)
