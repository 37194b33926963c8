"""Choose MuScleLoRA's learning rate for a backbone the paper did not use, on clean data only.

The defense is trained on a clean (unpoisoned) training subset and scored by its own model-selection
rule: accuracy on the clean dev set minus the GA references. No attack, no poisoned sample and no test
sample is involved, so the choice cannot favour any attack. The learning rate with the best clean dev
accuracy wins (ties: the smaller).

    PYTHONPATH=src nice -n 10 python benchmarks/muscle_tune_lr.py --lrs 2e-5,2e-4,1e-3 --train-size 1000 --epochs 2
"""

from __future__ import annotations

import argparse

from cleantune.data import load_benchmark
from cleantune.defenses import get_defense


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dataset", default="sst2")
    ap.add_argument("--defense", default="muscle-lora")
    ap.add_argument("--lrs", default="2e-5,2e-4,1e-3")
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    bench = load_benchmark(args.dataset)
    train = bench.train.stratified_sample(args.train_size, args.seed)
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        d = get_defense(args.defense, model=args.model, lr=lr, epochs=args.epochs, seed=args.seed)
        d.fit(train, bench.dev, progress=False)
        accs = [h["dev_acc"] for h in d.report_.history]
        rows.append((lr, max(accs)))
        print(f"lr {lr:g}: clean dev accuracy (selection set) per epoch {', '.join(f'{a:.4f}' for a in accs)}", flush=True)
    best = max(rows, key=lambda r: (r[1], -r[0]))
    print(f"{args.defense} on {args.model}, {args.dataset} clean train {args.train_size}, {args.epochs} epochs: "
          f"best lr {best[0]:g} (clean dev {best[1]:.4f})")


if __name__ == "__main__":
    main()
