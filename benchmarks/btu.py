"""BTU vs plain fine-tuning, side by side in one run: CACC/ASR at BTU's three points, the token audit,
and the wall-time ratio.

    nice -n 10 python benchmarks/btu.py --datasets sst2 --attacks badnets,addsent --train-size 2000 --epochs 2

Both defenses see the same poisoned training set (same seed) and the same epochs/lr/batch size: the
flags', or with `--btu-mode faithful` and a flag left out, the official protocol's (1 epoch, lr 2e-5,
batch 64) for both. Each keeps its own max_length (finetune 128, faithful BTU 512 capped at the
backbone's), which dynamic padding makes all but free on these short texts. "fit" time excludes the
evaluation on the test sets (BTU's three stage evaluations included), so the ratio compares what a user
pays to train. Every cell is checked before the first one trains.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import parser, positive_float, positive_int, run_script

from cleantune.defenses.btu import FAITHFUL
from cleantune.errors import UserError
from cleantune.evaluate import one_class_note
from cleantune.runner import RunConfig, run
from cleantune.store import ResultStore


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--datasets", default="sst2,hsol")
    ap.add_argument("--attacks", default="badnets,addsent")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--train-size", type=positive_int)
    ap.add_argument("--epochs", type=positive_int, help="default 2; faithful: 1")
    ap.add_argument("--lr", type=positive_float, help="default 1.5e-4; faithful: 2e-5")
    ap.add_argument("--batch-size", type=positive_int, help="default 32; faithful: 64")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--mode", default="mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--btu-mode", default="default", choices=("default", "faithful"))
    ap.add_argument("--clean-tuning", default="none")
    ap.add_argument("--no-finetune", action="store_true",
                    help="skip the separate finetune run (BTU's no_defense stage is that same model); no time ratio")
    ap.add_argument("--store", help="results store (default: a temporary one, removed at the end)")
    ap.add_argument("--json", help="also write all results to this file")
    args = ap.parse_args(argv)
    own = dict(epochs=2, lr=1.5e-4, batch_size=32) if args.btu_mode == "default" else \
        {k: FAITHFUL[k] for k in ("epochs", "lr", "batch_size")}
    given = {k: getattr(args, k) for k in own}
    common = dict(model=args.model, seed=args.seed, train_size=args.train_size, rate=args.rate, mode=args.mode,
                  **{k: own[k] if v is None else v for k, v in given.items()})
    cells = []
    for dataset in args.datasets.split(","):
        for attack in args.attacks.split(","):
            cell = dict(dataset=dataset, attack=attack, **common)
            if attack == "badnets":
                cell["triggers"] = ["cf"]  # one rare word, as in the BTU paper
            pair = (None if args.no_finetune else RunConfig(defense="finetune", **cell),
                    RunConfig(defense="btu", options={"btu_mode": args.btu_mode, "clean_tuning": args.clean_tuning},
                              **cell))
            for config in pair:
                if config is not None:
                    config.resolve()  # a bad name or setting in a later cell stops the script before any training
            cells.append((dataset, attack, pair))
    if args.json:  # before the training, not after it
        from cleantune.models import check_creatable

        if Path(args.json).is_dir():
            raise UserError(f"--json {args.json}: a folder; name the file to write")
        check_creatable(Path(args.json), f"--json {args.json}")
    with tempfile.TemporaryDirectory() as tmp:  # without --store, a store removed at the end (one was left per run)
        return _run_cells(cells, ResultStore(args.store or Path(tmp) / "btu.sqlite"), args)


def _run_cells(cells, store, args) -> int:
    rows = []
    for dataset, attack, (ft_config, bt_config) in cells:
        ft = None if ft_config is None else run(ft_config, store, force=True, progress=False)
        bt = run(bt_config, store, force=True, progress=False)
        bm = bt["metrics"]
        fm = ft["metrics"] if ft else None
        bt_fit = bt["timings"]["wall_s"] - bt["timings"]["eval_s"] - bm["btu_seconds"]["stage_eval"]
        ft_fit = ft["timings"]["wall_s"] - ft["timings"]["eval_s"] if ft else None
        row = {"dataset": dataset, "attack": attack, "n_train": bm["n_train"], "n_poisoned": bm["n_poisoned"],
               "finetune": {k: fm[k] for k in ("cacc", "asr", "asr_floor")} if fm else None,
               "btu_stages": bm["btu_stages"], "spared": bm["btu_spared"],
               "spared_triggers": bm["btu_spared_triggers"],
               "btu_final": {"cacc": bm["cacc"], "asr": bm["asr"]},
               "suspicious": len(bm["btu_suspicious"]), "trigger_ranks": bm["btu_trigger_ranks"],
               "token_precision": bm["btu_token_precision"], "token_recall": bm["btu_token_recall"],
               "collateral": bm["btu_collateral"][:10], "n_collateral": bm["btu_n_collateral"],
               "fit_s": {"finetune": ft_fit, "btu": bt_fit}, "fit_ratio": bt_fit / ft_fit if ft else None,
               "btu_seconds": bm["btu_seconds"],
               "wall_ratio": bt["timings"]["wall_s"] / ft["timings"]["wall_s"] if ft else None}
        rows.append(row)
        s = row["btu_stages"]
        print(f"== {dataset} {attack} ({args.mode} {args.rate}, n_train {row['n_train']}, poisoned {row['n_poisoned']}, "
              f"btu {args.btu_mode}, clean_tuning {args.clean_tuning})")
        for name, m in ([("finetune", fm)] if fm else []) + [(f"btu {n}", m) for n, m in s.items()]:
            print(f"  {name:<19} CACC {m['cacc']:.4f}  ASR {m['asr']:.4f}  (no-trigger floor {m['asr_floor']:.4f})")
            if note := one_class_note(name, m):
                print(f"  {note}")
        prec = row["token_precision"]
        print(f"  suspicious set {row['suspicious']} tokens; trigger ranks {row['trigger_ranks']}; token precision "
              f"{_fmt(prec)} recall {_fmt(row['token_recall'])}")
        if args.btu_mode == "default":  # faithful mode, the official protocol, has no guard
            print(f"  spared by the guard: {row['spared']} (trigger pieces among them: {row['spared_triggers']})")
        print(f"  collateral ({row['n_collateral']} frequent non-trigger tokens unlearned): {row['collateral']}")
        ratio = f", ratio {row['fit_ratio']:.2f} (wall incl. all evaluation: ratio {row['wall_ratio']:.2f})" if ft else ""
        print(f"  fit time: {f'finetune {ft_fit:.0f}s, ' if ft else ''}btu {bt_fit:.0f}s{ratio}; btu stages "
              + ", ".join(f"{k} {v:.0f}s" for k, v in row["btu_seconds"].items()), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # checked creatable before the training
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    run_script(main)
