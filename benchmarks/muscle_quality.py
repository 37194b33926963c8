"""The MuScleLoRA benchmark grid of issue 3: datasets x attacks x defenses, stored in the results store.

Attacks as published (spec 8): BadNets clean-label with 4 triggers drawn from cf, mn, bb, tq; AddSent,
Syntactic and Style dirty-label "mix"; rate 0.1, target 1. Prints every cell, then per defense the
average and worst ASR and the CACC gap to plain fine-tuning on the same data.

Full run (what the issue checks; 10 epochs on the full training sets, far beyond a shared 2-core CPU):
    PYTHONPATH=src python benchmarks/muscle_quality.py
Small run:
    PYTHONPATH=src nice -n 10 python benchmarks/muscle_quality.py --datasets sst2 --attacks badnets,addsent \
        --defenses finetune,muscle-lora --train-size 2000 --epochs 2

Every cell is checked before the first one trains.
"""

from __future__ import annotations

from collections import defaultdict

from common import names, parser, positive_float, positive_int, run_script

from cleantune.cli import format_table
from cleantune.evaluate import one_class_note
from cleantune.runner import RunConfig, run
from cleantune.store import ResultStore

ATTACKS = {
    "badnets": dict(mode="clean", num_triggers=4, triggers=["cf", "mn", "bb", "tq"]),
    "addsent": dict(mode="mix"),
    "syntactic": dict(mode="mix"),
    "style": dict(mode="mix"),
}
ABLATIONS = "finetune,lora,ga,ga-lora,lora-mslr,muscle-lora"


def main():
    ap = parser(__doc__)
    ap.add_argument("--datasets", default="sst2,hsol")
    ap.add_argument("--attacks", default="badnets,addsent,syntactic,style")
    ap.add_argument("--defenses", default=ABLATIONS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seed", type=int, default=42, help="the paper's seed")
    ap.add_argument("--train-size", type=positive_int, default=None)
    ap.add_argument("--epochs", type=positive_int, default=None, help="default: each defense's own (MuScleLoRA 10)")
    ap.add_argument("--lr", type=positive_float, default=None, help="default: each defense's own")
    ap.add_argument("--finetune-epochs", type=positive_int, default=None, help="epochs for finetune only")
    ap.add_argument("--finetune-lr", type=positive_float, default=None, help="lr for finetune only")
    ap.add_argument("--store", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    configs = []
    for dataset in args.datasets.split(","):
        for attack in names("--attacks", args.attacks, ATTACKS):
            for defense in args.defenses.split(","):
                ft = defense == "finetune"
                epochs = args.finetune_epochs if ft and args.finetune_epochs is not None else args.epochs
                lr = args.finetune_lr if ft and args.finetune_lr is not None else args.lr
                configs.append(RunConfig(dataset=dataset, attack=attack, defense=defense, model=args.model,
                                         seed=args.seed, epochs=epochs, lr=lr, train_size=args.train_size, rate=0.1,
                                         target=1, **ATTACKS[attack]))
                configs[-1].resolve()
    store = ResultStore(args.store)
    results = []
    for cfg in configs:
        r = run(cfg, store, progress=not args.no_progress)
        m = r["metrics"]
        print(f"{cfg.dataset} {cfg.attack} {cfg.defense}: CACC {m['cacc']:.4f} ASR {m['asr']:.4f} "
              f"(best epoch {m['best_epoch']}, {r['timings']['wall_s']:.0f} s{', stored' if r['reused'] else ''})",
              flush=True)
        if note := one_class_note(f"{cfg.dataset} {cfg.attack} {cfg.defense}", m):
            print(note, flush=True)
        results.append(r)
    print(format_table(results))
    by_def = defaultdict(list)
    ft_cacc = {(r["config"]["dataset"], r["config"]["attack"]): r["metrics"]["cacc"]
               for r in results if r["config"]["defense"] == "finetune"}
    for r in results:
        by_def[r["config"]["defense"]].append(r)
    print("\ndefense       mean ASR  max ASR  mean CACC  CACC - finetune (mean, worst)")
    for d, rs in by_def.items():
        asr = [r["metrics"]["asr"] for r in rs]
        cacc = [r["metrics"]["cacc"] for r in rs]
        gaps = [r["metrics"]["cacc"] - ft_cacc[k] for r in rs
                if (k := (r["config"]["dataset"], r["config"]["attack"])) in ft_cacc]
        gap = f"{sum(gaps) / len(gaps):+.4f}, {min(gaps):+.4f}" if gaps else "-"
        print(f"{d:12s}  {sum(asr) / len(asr):.4f}    {max(asr):.4f}   {sum(cacc) / len(cacc):.4f}     {gap}")
    print(f"store: {store.path}")


if __name__ == "__main__":
    run_script(main)
