"""Cost of one MuScleLoRA training step vs one plain full fine-tuning step on the same batches.

Both go through the one training loop (cleantune.training.train via Defense.fit) for one epoch over the
same samples in the same order; the loop's own train time (model loading and dev evaluation excluded)
divided by the number of steps is the cost per step. MuScleLoRA's step is a LoRA+MSLR forward/backward
plus the gradient-alignment reference forward/backward (no base-weight gradients). Target: <= 2x.

    PYTHONPATH=src nice -n 10 python benchmarks/muscle_step_cost.py --steps 10 --repeats 2
"""

from __future__ import annotations

import argparse
import math

import torch

from cleantune.data import load_benchmark
from cleantune.defenses import get_defense


def ms_per_step(defense_name: str, train, dev, batch_size: int, model: str, **options) -> float:
    d = get_defense(defense_name, model=model, epochs=1, batch_size=batch_size, seed=0, **options)
    d.fit(train, dev, progress=False)
    return 1000 * d.report_.train_seconds / math.ceil(len(train) / batch_size)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs; the fastest of each is kept")
    ap.add_argument("--with-ga", action="store_true", help="also time 'ga' (full fine-tuning + GA)")
    args = ap.parse_args()
    bench = load_benchmark("sst2")
    train = bench.train.stratified_sample(args.steps * args.batch_size, 0)
    dev = bench.dev.subset(range(200))  # 96 GA references + 104 for selection
    names = ["finetune", "muscle-lora"] + (["ga"] if args.with_ga else [])
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            # same optimiser settings for both, so only the step's work differs
            times[n].append(ms_per_step(n, train, dev, args.batch_size, args.model, lr=2e-5))
    best = {n: min(t) for n, t in times.items()}
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps per run, {args.repeats} runs each, "
          f"torch threads {torch.get_num_threads()}")
    for n in names:
        print(f"{n:12s} {best[n]:8.1f} ms/step   (runs: {', '.join(f'{t:.0f}' for t in times[n])})")
    ratio = best["muscle-lora"] / best["finetune"]
    print(f"muscle-lora / finetune = {ratio:.2f}x  (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
