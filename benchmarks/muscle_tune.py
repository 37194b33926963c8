"""Choose MuScleLoRA's learning rate and MSLR alpha for a backbone the paper did not use, on clean data only.

The defense is trained on a clean (unpoisoned) training subset and scored by its own model-selection
rule: accuracy on the clean dev set minus the GA references. No attack, no poisoned sample and no test
sample is involved, so the choice cannot favour any attack. The candidate with the best clean dev
accuracy wins (ties: the smaller lr, then the larger alpha, the published side).

Per candidate it also prints the share of steps per epoch in which gradient alignment fell back to the
raw gradient (the reference loss had dropped below min_ref_loss before GA's mixing epoch): a learning
rate that fits the references within the first epoch leaves most of that epoch unaligned.
For each alpha it prints the MSLR's size at initialisation on the clean dev inputs,
||dW x|| / ||W0 x|| and the share of saturated tanh units after the layer (spec 2.3), the quantity
the alpha rule in docs/muscle-lora.md is about.

    PYTHONPATH=src python benchmarks/muscle_tune.py --lrs 1e-3,3e-3 --mslr-alphas 6,2,0.5 --train-size 1000 --epochs 4

Any other defense's lr is chosen the same way (`--defense finetune --lrs 1e-4,3e-4`).
"""

from __future__ import annotations

import time

import torch

from common import floats, parser, positive_int, run_script

from cleantune.adapters import mslr as A
from cleantune.data import load_benchmark
from cleantune.defenses import DEFENSES, get_defense
from cleantune.errors import UserError
from cleantune.models import load_model, load_tokenizer


def init_size(model_name: str, texts: list[str], alpha: float | None, seed: int) -> tuple[float, float]:
    """(mean ||dW x|| / ||W0 x||, share of |tanh| > 0.99) at the MSLR's init, on `texts`."""
    torch.manual_seed(seed)
    model, tok = load_model(model_name, ["0", "1"]).eval(), load_tokenizer(model_name)
    scales, published = A.published_mslr(model)
    target = A.default_target(model)
    base = model.get_submodule(target)
    captured = {}
    handle = base.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
        handle.remove()
        x = captured["x"]
        z0 = base(x)
        layer = A.inject_mslr(model, A.MSLRConfig(scales, 1, published if alpha is None else alpha, None))
        z = layer(x)
    ratio = ((z - z0).norm(dim=-1) / z0.norm(dim=-1)).mean().item()
    return ratio, (z.tanh().abs() > 0.99).float().mean().item()


def main():
    ap = parser(__doc__)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dataset", default="sst2")
    ap.add_argument("--defense", default="muscle-lora", choices=list(DEFENSES))
    ap.add_argument("--lrs", type=floats, default="2e-5,2e-4,1e-3")
    ap.add_argument("--mslr-alphas", type=floats, default="", help="comma list; empty: the published alpha only")
    ap.add_argument("--train-size", type=int, default=1000, help="0: the whole train split")
    ap.add_argument("--epochs", type=positive_int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if args.train_size < 0:
        raise UserError(f"--train-size must be positive, or 0 for the whole train split, got {args.train_size}")
    if not args.lrs:
        raise UserError("--lrs: no learning rate given")
    alphas = args.mslr_alphas or [None]
    components = getattr(DEFENSES[args.defense], "components", ())
    has_mslr = "mslr" in components
    if alphas != [None] and not has_mslr:
        ap.error(f"--mslr-alphas: defense {args.defense} has no MSLR")
    bench = load_benchmark(args.dataset)
    train = bench.train.stratified_sample(args.train_size, args.seed) if args.train_size else bench.train

    def named(a):
        return f" mslr_alpha {a if a is not None else 'published'}" if has_mslr else ""

    if has_mslr:
        for a in alphas:
            ratio, sat = init_size(args.model, bench.dev.texts[:128], a, args.seed)
            print(f"{named(a).strip()}: at init ||dW x||/||W0 x|| {ratio:.1f}, saturated tanh units {sat:.3f}",
                  flush=True)
    rows = []
    for a in alphas:
        for lr in args.lrs:
            opts = {} if a is None else {"mslr_alpha": a}
            d = get_defense(args.defense, model=args.model, lr=lr, epochs=args.epochs, seed=args.seed, **opts)
            t0 = time.time()
            d.fit(train, bench.dev, progress=False)
            accs = [h["dev_acc"] for h in d.report_.history]
            rows.append((lr, a, max(accs)))
            ga = ("; share of steps GA left raw per epoch " + ", ".join(f"{h['ga_raw']:.2f}" for h in d.report_.history)
                  if "ga" in components else "")
            print(f"lr {lr:g}{named(a)}: clean dev accuracy (selection set) per epoch "
                  f"{', '.join(f'{x:.4f}' for x in accs)}{ga} ({time.time() - t0:.0f} s)", flush=True)
    best = max(rows, key=lambda r: (r[2], -r[0], r[1] if r[1] is not None else float("inf")))
    print(f"{args.defense} on {args.model}, {args.dataset} clean train {args.train_size}, {args.epochs} epochs: "
          f"best lr {best[0]:g}{named(best[1])} (clean dev {best[2]:.4f})")


if __name__ == "__main__":
    run_script(main)
