"""Baseline defenses side by side: CACC, ASR and detection scores per (attack, defense), stored.

    PYTHONPATH=src nice -n 10 python benchmarks/baselines.py --attacks badnets,syntactic \
        --defenses finetune,strip,rap,bki,onion --train-size 1000 --epochs 2

Plain fine-tuning is trained once per attack and saved; the inference-time defenses (strip, rap,
onion) wrap that same victim (their `victim` option) instead of training an identical copy. A victim
saved and stored by an earlier invocation with the identical config is reused, with its stored
numbers, instead of being trained again. The
training-time defenses (bki, cube, abl) train their own models. Every number is on the clean
test split and the triggered non-target test samples, optionally a seeded subsample of each
(`--test-size`; ONION, which runs its language model (n_words + 1) times per input, has its own
`--onion-test-size`). Thresholds and epochs are chosen on clean dev only. Results go to the
results store with the full config (test sizes included) and are printed as a table.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

import yaml
from common import names, parser, positive_float, positive_int, run_script

from cleantune.attacks import ATTACKS
from cleantune.data import load_benchmark
from cleantune.defenses import DEFENSES
from cleantune.errors import UserError
from cleantune.evaluate import evaluate, one_class_note
from cleantune.models import Classifier
from cleantune.runner import RunConfig, detection, environment
from cleantune.store import ResultStore, config_hash, data_dir

INFERENCE_TIME = ("strip", "rap", "onion")


def parse_options(items: list[str]) -> dict[str, dict]:
    """--option DEFENSE.KEY=VALUE -> {defense: {key: value}}"""
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        defense, _, key = key.partition(".")
        if not (defense.strip() and key.strip() and value.strip()):
            raise UserError(f"--option expects DEFENSE.KEY=VALUE, got '{item}'")
        try:
            out.setdefault(defense.strip(), {})[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--option {item}: cannot parse the value ({str(e).splitlines()[0]})") from None
    return out


def subsample(ds, n: int | None, seed: int):
    return ds if n is None else ds.stratified_sample(n, seed)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--attacks", default="badnets,syntactic")
    p.add_argument("--defenses", default="finetune,strip,rap,bki,onion,cube,abl")
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-size", type=positive_int, default=1000)
    p.add_argument("--epochs", type=positive_int, default=2)
    p.add_argument("--lr", type=positive_float, default=1.5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=positive_int, default=None, help="subsample of clean and of triggered test")
    p.add_argument("--onion-test-size", type=positive_int, default=100)
    p.add_argument("--option", action="append", default=[], metavar="DEFENSE.KEY=VALUE")
    p.add_argument("--store", default=None)
    args = p.parse_args(argv)

    options = parse_options(args.option)
    defenses = names("--defenses", args.defenses, DEFENSES)  # "," ran nothing and printed an empty table
    # the shared victim is plain fine-tuning, so it is trained first whenever a wrapper needs it
    order = sorted(defenses, key=lambda d: d != "finetune")
    if set(order) & set(INFERENCE_TIME) and "finetune" not in order:
        order = ["finetune"] + order
    unused = next((d for d in options if d not in order), None)
    if unused is not None:
        raise UserError(f"--option: defense '{unused}' is not among --defenses ({', '.join(order)})")

    def config_of(attack: str, name: str, victim) -> RunConfig:
        opts = dict(options.get(name, {}))
        if name in INFERENCE_TIME and victim is not None:
            opts["victim"] = str(victim)
        return RunConfig(dataset=args.dataset, attack=attack, defense=name, model=args.model, seed=args.seed,
                         epochs=args.epochs, lr=args.lr, train_size=args.train_size, options=opts)

    attacks = names("--attacks", args.attacks, ATTACKS)
    for attack in attacks:  # every cell checked (the victim a wrapper gets aside) before the first one trains
        for name in order:
            config_of(attack, name, None).resolve()
    store = ResultStore(args.store)
    bench = load_benchmark(args.dataset)
    bench.train = bench.train.stratified_sample(args.train_size, args.seed)
    rows = []
    for attack in attacks:
        victim_dir = None
        for name in order:
            config = config_of(attack, name, victim_dir)
            resolved = config.resolve()
            test_size = args.onion_test_size if name == "onion" else args.test_size
            resolved["test_size"] = test_size
            poisoned = config.build_attack().apply(bench)
            poisoned.clean_test = subsample(poisoned.clean_test, test_size, args.seed)
            poisoned.triggered_test = subsample(poisoned.triggered_test, test_size, args.seed)
            defense = config.build_defense()
            run_id = config_hash(resolved)
            saved = data_dir() / "victims" / run_id[:16]
            stored = store.get(run_id)
            if name == "finetune" and saved.is_dir() and stored is not None and stored["status"] == "ok":
                victim_dir = saved  # trained by an earlier invocation with the same config: reuse it
                metrics, timings, extra = stored["metrics"], stored["timings"], {}
            else:
                t0 = time.perf_counter()
                work = data_dir() / "runs" / run_id[:16]  # checkpoints for a crash; removed once stored, as `run` does
                model = defense.fit(poisoned.train, poisoned.dev, out_dir=work, progress=False)
                fit_s = time.perf_counter() - t0
                if name == "finetune":
                    victim_dir = model.save_pretrained(saved)
                extra = getattr(defense, "extra_metrics_", {})
                metrics = evaluate(model, poisoned.clean_test, poisoned.triggered_test)
                metrics.update(extra)
                metrics.update(detection(defense, model, poisoned))
                if name == "onion":  # its test subsample differs from the victim's: score the victim on it too
                    metrics["victim_on_onion_test"] = evaluate(Classifier.from_pretrained(victim_dir),
                                                               poisoned.clean_test, poisoned.triggered_test)
                metrics.update({"best_epoch": defense.report_.best_epoch, "history": defense.report_.history,
                                "n_clean_test": len(poisoned.clean_test),
                                "n_triggered_test": len(poisoned.triggered_test)})
                timings = {"fit_s": fit_s, "wall_s": time.perf_counter() - t0}
                store.put(run_id, resolved, metrics, timings, environment())
                shutil.rmtree(work, ignore_errors=True)
            det = metrics.get("train_detection") or metrics.get("test_detection") or {}
            kind = "train" if "train_detection" in metrics else "test" if det else ""
            rows.append([attack, name, metrics["cacc"], metrics["asr"], metrics.get("asr_floor"), kind,
                         det.get("precision"), det.get("recall"), det.get("frr"), det.get("far"),
                         f"{metrics['n_clean_test']}+{metrics['n_triggered_test']}", timings["wall_s"]])
            print(f"{attack:10} {name:9} cacc={metrics['cacc']:.3f} asr={metrics['asr']:.3f} "
                  f"asr_floor={metrics.get('asr_floor', float('nan')):.3f} "
                  + (f"{kind}-detection={json.dumps({k: round(v, 3) for k, v in det.items()})} " if det else "")
                  + f"extra={json.dumps({k: v for k, v in extra.items() if k != 'isolation_history'})} "
                  f"{'victim_on_onion_test=' + json.dumps(metrics['victim_on_onion_test']) + ' ' if name == 'onion' else ''}"
                  f"n_test={metrics['n_clean_test']}+{metrics['n_triggered_test']} wall={timings['wall_s']:.0f}s",
                  flush=True)
            if note := one_class_note(f"{attack} {name}", metrics):
                print(note, flush=True)

    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("\n| attack | defense | CACC | ASR | asr_floor | flags | precision | recall | FRR | FAR | test n | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(f"{v:.0f}" if i == len(r) - 1 else fmt(v) for i, v in enumerate(r)) + " |")
    print(f"\nstore: {store.path}; train size {args.train_size}, {args.epochs} epochs, lr {args.lr}, seed {args.seed}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_script(main)
