"""The benchmark scripts refuse bad input as the command line does: one line, exit code 2, before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script,args,line", [
    ("btu.py", ["--datasets", "sst2,nope"], "btu.py: error: unknown dataset 'nope'"),
    ("btu.py", ["--epochs", "0"], "btu.py: error: argument --epochs: must be a positive integer, got '0'"),
    ("baselines.py", ["--option", "frr=0.05"], "baselines.py: error: --option expects DEFENSE.KEY=VALUE, got 'frr=0.05'"),
    ("baselines.py", ["--defenses", "finetune,strip", "--option", "stirp.frr=0.05"],
     "baselines.py: error: --option: defense 'stirp' is not among --defenses (finetune, strip)"),
    ("baselines.py", ["--defenses", "finetune,bogus"], "baselines.py: error: --defenses: unknown name 'bogus' (known: "),
    ("muscle_quality.py", ["--attacks", "nope"], "muscle_quality.py: error: --attacks: unknown name 'nope'"),
    ("muscle_quality.py", ["--finetune-epochs", "0"], "muscle_quality.py: error: argument --finetune-epochs: must be"),
    ("muscle_tune.py", ["--lrs", "abc"], "muscle_tune.py: error: argument --lrs: must be a positive number, got 'abc'"),
    ("muscle_step_cost.py", ["--repeats", "0"], "muscle_step_cost.py: error: argument --repeats: must be a positive"),
    ("throughput.py", ["--samples", "0"], "throughput.py: error: argument --samples: must be a positive integer"),
    ("make_poisoned_sst2.py", ["{tmp}"], "make_poisoned_sst2.py: error: {tmp}: a folder; name the .tsv file to write"),
    ("baselines.py", ["--defenses", ","], "baselines.py: error: --defenses: no name given"),  # an empty table, exit 0
    ("btu.py", ["--json", "{tmp}"], "btu.py: error: --json {tmp}: a folder; name the file to write"),  # after training
    ("muscle_step_cost.py", ["--count-ops", "--steps", "200"],  # its 2N-step run was cut to the split: a low count
     "muscle_step_cost.py: error: --count-ops trains 2 x --steps x --batch-size = 12800 samples, more than sst2's 6920"),
    ("cublas_overhead.py", ["--foo"], "cublas_overhead.py: error: unrecognized arguments: --foo"),  # a traceback
])
def test_bad_input_is_one_line_and_nothing_trains(tiny_model, tmp_path, script, args, line):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    model = [] if script in ("make_poisoned_sst2.py", "cublas_overhead.py") else ["--model", tiny_model]
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *model, *args], capture_output=True,
                       text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(line.replace("{tmp}", str(tmp_path))), p.stderr
    # no store (the default one is under $XDG_DATA_HOME, here in tmp_path), no run folder, no partial file
    assert not (tmp_path / "xdg-data").exists() and not [x for x in tmp_path.iterdir() if x.is_file()]


def test_benchmark_scripts_note_a_model_that_predicts_one_class(tiny_model, tmp_path, capsys, monkeypatch):
    # such a row's CACC and ASR say nothing of a defense; `cleantune run` says so, and so must the scripts
    from cleantune import runner

    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: {**real(*a, **k), "predicted_classes": 1})
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import muscle_quality

    monkeypatch.setattr(sys, "argv", ["muscle_quality.py", "--model", tiny_model, "--datasets", "sst2",
                                      "--attacks", "addsent", "--defenses", "finetune", "--train-size", "64",
                                      "--epochs", "1", "--no-progress", "--store", str(tmp_path / "s.sqlite")])
    muscle_quality.main()
    assert "note: sst2 addsent finetune predicts one class for every clean test sample" in capsys.readouterr().out


def _script(monkeypatch, name):
    """A benchmark script imported as a module (they import `common` from their own folder)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_positive_number_options_refuse_zero(monkeypatch):
    # an lr or lr list of 0 trains nothing and would be printed as a tuned result
    import argparse

    common = _script(monkeypatch, "common")
    for parse in (common.positive_float, common.floats):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive number, got '0'"):
            parse("0")
    assert common.floats("1e-4, 3e-4,") == [1e-4, 3e-4]


def _btu_result(defense):
    """What `run` returns for a btu.py cell: the finetune victim, or BTU with its stage metrics."""
    if defense == "finetune":
        return {"metrics": {"cacc": 0.9, "asr": 1.0, "asr_floor": 0.1}, "timings": {"wall_s": 50.0, "eval_s": 10.0}}
    stage = {"cacc": 0.88, "asr": 0.12, "asr_floor": 0.1}
    return {"metrics": {"n_train": 64, "n_poisoned": 6, "btu_stages": {"no_defense": stage, "final": stage},
                        "btu_spared": [], "btu_spared_triggers": [], "cacc": 0.88, "asr": 0.12,
                        "btu_suspicious": ["cf"], "btu_trigger_ranks": {"cf": [1, 1]}, "btu_token_precision": 1.0,
                        "btu_token_recall": 1.0, "btu_collateral": [], "btu_n_collateral": 0,
                        "btu_seconds": {"victim": 60.0, "stage_eval": 20.0}},
            "timings": {"wall_s": 130.0, "eval_s": 10.0}}


def test_btu_script_runs_both_defenses_with_the_settings_it_claims(tiny_model, tmp_path, monkeypatch, capsys):
    # btu.py's docs quote finetune and BTU side by side "with the same data, seed, epochs/lr/batch": a flag
    # left out takes the script's own default (default mode: 2 epochs, lr 1.5e-4, batch 32; faithful: the
    # official 1, 2e-5, 64), a flag given overrides it for both, and BadNets uses the one rare trigger "cf"
    btu = _script(monkeypatch, "btu")
    calls = []
    monkeypatch.setattr(btu, "run", lambda config, store, **k: calls.append(config) or _btu_result(config.defense))
    base = ["--model", tiny_model, "--datasets", "sst2", "--attacks", "badnets,addsent", "--train-size", "64",
            "--seed", "5", "--rate", "0.2", "--store", str(tmp_path / "s.sqlite")]
    assert btu.main(base + ["--lr", "3e-4", "--clean-tuning", "8", "--json", str(tmp_path / "r.json")]) == 0
    assert [(c.attack, c.defense) for c in calls] == [("badnets", "finetune"), ("badnets", "btu"),
                                                     ("addsent", "finetune"), ("addsent", "btu")]
    for c in calls:
        assert (c.epochs, c.lr, c.batch_size, c.seed, c.rate, c.mode, c.train_size) == (2, 3e-4, 32, 5, 0.2, "mix", 64)
        assert c.triggers == (["cf"] if c.attack == "badnets" else None)
        assert c.options == ({} if c.defense == "finetune" else {"btu_mode": "default", "clean_tuning": "8"})
    calls.clear()
    assert btu.main(base + ["--btu-mode", "faithful", "--batch-size", "16"]) == 0
    assert {(c.epochs, c.lr, c.batch_size) for c in calls} == {(1, 2e-5, 16)}
    # fit time leaves out the test evaluation and BTU's stage evaluations: btu 130 - 10 - 20, finetune 50 - 10
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 2 and rows[0]["fit_s"] == {"finetune": 40.0, "btu": 100.0}
    assert rows[0]["fit_ratio"] == pytest.approx(100 / 40) and rows[0]["wall_ratio"] == pytest.approx(130 / 50)
    assert rows[0]["finetune"] == {"cacc": 0.9, "asr": 1.0, "asr_floor": 0.1}
    assert "ratio 2.50 (wall incl. all evaluation: ratio 2.60)" in capsys.readouterr().out


def test_btu_script_no_finetune_runs_btu_alone(tiny_model, tmp_path, monkeypatch):
    # --no-finetune is the documented full-split command: one run per cell, no ratio
    btu = _script(monkeypatch, "btu")
    calls = []
    monkeypatch.setattr(btu, "run", lambda config, store, **k: calls.append(config) or _btu_result(config.defense))
    assert btu.main(["--model", tiny_model, "--datasets", "sst2", "--attacks", "addsent", "--train-size", "64",
                     "--no-finetune", "--json", str(tmp_path / "r.json")]) == 0
    assert [c.defense for c in calls] == ["btu"]
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["finetune"] is None and row["fit_ratio"] is None and row["fit_s"]["btu"] == 100.0


def test_muscle_quality_cells_and_summary(tiny_model, tmp_path, monkeypatch, capsys):
    # the docs quote this summary (mean and max ASR, mean CACC, the CACC gap to finetune on the same cell,
    # its mean and its worst) and the cells' settings: BadNets clean-label with its 4 triggers, the
    # finetune-only epochs/lr, the given seed
    mq = _script(monkeypatch, "muscle_quality")
    metrics = {("badnets", "finetune"): (0.90, 1.00), ("badnets", "lora"): (0.85, 0.20),
               ("addsent", "finetune"): (0.88, 0.95), ("addsent", "lora"): (0.89, 0.40)}
    calls = []

    def fake_run(cfg, store, progress=True):
        calls.append(cfg)
        cacc, asr = metrics[cfg.attack, cfg.defense]
        return {"config": {"dataset": cfg.dataset, "attack": cfg.attack, "defense": cfg.defense},
                "metrics": {"cacc": cacc, "asr": asr, "best_epoch": 0}, "timings": {"wall_s": 1.0}, "reused": False}

    monkeypatch.setattr(mq, "run", fake_run)
    monkeypatch.setattr(mq, "format_table", lambda results: "")
    monkeypatch.setattr(sys, "argv", ["muscle_quality.py", "--model", tiny_model, "--datasets", "sst2",
                                      "--attacks", "badnets,addsent", "--defenses", "finetune,lora", "--seed", "9",
                                      "--train-size", "64", "--epochs", "3", "--lr", "1e-3", "--finetune-epochs", "1",
                                      "--finetune-lr", "2e-4", "--store", str(tmp_path / "s.sqlite")])
    mq.main()
    for c in calls:
        ft = c.defense == "finetune"
        assert (c.epochs, c.lr, c.seed, c.rate, c.target, c.train_size) == (1 if ft else 3, 2e-4 if ft else 1e-3,
                                                                            9, 0.1, 1, 64)
        assert (c.mode, c.num_triggers, c.triggers) == (("clean", 4, ["cf", "mn", "bb", "tq"]) if c.attack == "badnets"
                                                        else ("mix", None, None))
    summary = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
               if line.split()[:1] in (["finetune"], ["lora"])}
    # lora: ASR 0.20, 0.40; CACC 0.85, 0.89 against finetune's 0.90, 0.88: gaps -0.05, +0.01
    assert summary["lora"] == ["0.3000", "0.4000", "0.8700", "-0.0200,", "-0.0500"]
    assert summary["finetune"] == ["0.9750", "1.0000", "0.8900", "+0.0000,", "+0.0000"]


def test_muscle_tune_picks_the_best_clean_dev_accuracy_with_the_documented_ties(monkeypatch, capsys):
    # the chosen lr/alpha is what the docs adopt as a default: the best epoch's clean dev accuracy (not the
    # last epoch's), ties to the smaller lr, then the larger alpha; trained on a seeded clean train subsample and
    # selected on the clean dev split, never the test split
    mt = _script(monkeypatch, "muscle_tune")
    from cleantune.data import load_benchmark

    bench = load_benchmark("sst2")
    accs = {(1e-3, 2.0): [0.80, 0.60], (3e-3, 2.0): [0.80, 0.50], (1e-3, 0.5): [0.80, 0.75], (3e-3, 0.5): [0.60, 0.78]}
    fits = []

    class FakeDefense:
        def __init__(self, **kw):
            self.kw = kw

        def fit(self, train, dev, progress=True):
            fits.append((self.kw, train, dev))
            hist = accs[self.kw["lr"], self.kw["mslr_alpha"]]
            self.report_ = type("R", (), {"history": [{"dev_acc": a, "ga_raw": 0.0} for a in hist]})()

    monkeypatch.setattr(mt, "get_defense", lambda name, **kw: FakeDefense(name=name, **kw))
    monkeypatch.setattr(mt, "init_size", lambda model, texts, alpha, seed: (1.0, 0.0))
    monkeypatch.setattr(sys, "argv", ["muscle_tune.py", "--lrs", "1e-3,3e-3", "--mslr-alphas", "0.5,2",
                                      "--train-size", "40", "--epochs", "2", "--seed", "7"])
    mt.main()
    assert capsys.readouterr().out.splitlines()[-1].endswith("best lr 0.001 mslr_alpha 2.0 (clean dev 0.8000)")
    assert len(fits) == 4
    expected_train = bench.train.stratified_sample(40, 7)
    for kw, train, dev in fits:
        assert (kw["name"], kw["seed"], kw["epochs"], kw["model"]) == ("muscle-lora", 7, 2, "minilm")
        assert train.texts == expected_train.texts and not any(train.poisoned or [])
        assert dev.texts == bench.dev.texts


def test_throughput_pad_factor_and_roofline(monkeypatch):
    # the share of the roofline counts every token the model computes on, padding included, per non-padding
    # token; the roofline is 2 n^3 flops per square matmul
    tp = _script(monkeypatch, "throughput")
    from cleantune.training import TrainSettings

    ids = [[1] * 3, [1] * 5, [1] * 2, [1] * 8]  # 18 tokens
    assert tp._pad_factor(ids, TrainSettings(batch_size=4)) == pytest.approx(4 * 8 / 18)  # one batch, padded to 8
    assert tp._pad_factor(ids, TrainSettings(batch_size=1)) == pytest.approx(1.0)  # nothing padded
    assert tp._pad_factor(ids, TrainSettings(batch_size=1, pad_to_length=10, group_by_length=False)) == \
        pytest.approx(4 * 10 / 18)
    clock = iter(range(100))
    monkeypatch.setattr(tp.time, "perf_counter", lambda: float(next(clock)))  # every matmul takes "1 s"
    monkeypatch.setattr(tp.torch.cuda, "is_available", lambda: False)
    assert tp.matmul_roofline(n=64, repeats=2) == pytest.approx(2 * 64**3 / 1e9)


def test_throughput_reports_the_speed_up_of_dynamic_padding(tiny_model, monkeypatch, capsys):
    # the README quotes the speed-up (dynamic over fixed padding, non-padding tokens/s) and the model FLOP/s:
    # 6 x non-embedding parameters x tokens computed per second
    tp = _script(monkeypatch, "throughput")
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification

    def fake_train(model, tok, data, dev, settings, progress=True):
        tps = 1e9 if settings.pad_to_length is None else 4e8
        return SimpleNamespace(tokens_per_s=tps, samples_per_s=tps / 1e7)

    monkeypatch.setattr(tp, "train", fake_train)
    monkeypatch.setattr(tp, "_pad_factor", lambda ids, settings: 1.0 if settings.pad_to_length is None else 2.0)
    monkeypatch.setattr(tp, "matmul_roofline", lambda: 1e6)
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--model", tiny_model, "--samples", "64"])
    tp.main()
    out = capsys.readouterr().out
    assert "speed-up of dynamic padding (non-padding tokens/s): 2.50x" in out
    m = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    non_emb = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in m.bert.embeddings.parameters())
    dyn = next(line for line in out.splitlines() if line.startswith("dynamic padding"))
    fixed = next(line for line in out.splitlines() if line.startswith("fixed 128-token padding"))
    assert dyn.split()[-2] == f"{6 * non_emb * 1.0:.1f}" and fixed.split()[-2] == f"{6 * non_emb * 0.4 * 2.0:.1f}"


def test_make_poisoned_sst2_writes_the_whole_mix_poisoned_train_split(tmp_path, monkeypatch, capsys):
    # the file `cleantune scan` is timed on: every train sample, 10% of them given the trigger "cf" and the
    # target label (mix: drawn from both classes, so some labels flip)
    mp = _script(monkeypatch, "make_poisoned_sst2")
    from cleantune.data import load_benchmark

    train = load_benchmark("sst2").train
    out = tmp_path / "p.tsv"
    monkeypatch.setattr(sys, "argv", ["make_poisoned_sst2.py", str(out)])
    mp.main()
    lines = out.read_text().splitlines()
    assert lines[0] == "sentence\tlabel" and len(lines) == len(train) + 1
    rows = [line.rsplit("\t", 1) for line in lines[1:]]
    with_cf = [y for t, y in rows if "cf" in t.split()]
    assert set(with_cf) == {"1"} and len(with_cf) == round(0.1 * len(train))
    assert sum(y == "1" for _, y in rows) > sum(y == 1 for y in train.labels)  # some negatives were flipped
    assert capsys.readouterr().out == f"wrote {out}: {len(train)} rows, {len(with_cf)} poisoned\n"


def test_baselines_trains_the_victim_first_and_scores_each_defense_on_its_own_test_subsample(tiny_model, tmp_path,
                                                                                              monkeypatch):
    # docs/baselines.md quotes rows "600 + 600, ONION 40 + 40": every defense on a seeded --test-size subsample of
    # the clean and of the triggered test split, ONION on its own --onion-test-size, the size stored with the
    # config; a wrapper named before finetune still wraps the victim trained in this run (not one of its own),
    # which trains on the cell's data as `cleantune run` draws it (train subsample seeded by --seed)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cleantune.defenses import finetune as ft_module
    from cleantune.models import load_tokenizer
    from cleantune.runner import RunConfig
    from cleantune.store import ResultStore

    torch.manual_seed(0)
    lm = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(vocab_size=load_tokenizer(tiny_model).vocab_size, n_positions=128, n_embd=8,
                               n_layer=1, n_head=2)).save_pretrained(lm)
    load_tokenizer(tiny_model).save_pretrained(lm)
    trained, real_fit = [], ft_module.FineTune.fit
    monkeypatch.setattr(ft_module.FineTune, "fit",
                        lambda self, train, *a, **k: trained.append(train.texts) or real_fit(self, train, *a, **k))
    bl = _script(monkeypatch, "baselines")
    store = tmp_path / "s.sqlite"
    assert bl.main(["--model", tiny_model, "--attacks", "badnets", "--defenses", "onion,finetune", "--train-size", "64",
                    "--epochs", "1", "--seed", "3", "--test-size", "10", "--onion-test-size", "4",
                    "--option", f"onion.lm={lm}", "--store", str(store)]) == 0
    runs = {r["config"]["defense"]: r for r in ResultStore(store).runs()}
    assert set(runs) == {"finetune", "onion"} and len(trained) == 1  # one victim, trained once
    for name, n in (("finetune", 10), ("onion", 4)):
        assert runs[name]["config"]["test_size"] == n
        assert (runs[name]["metrics"]["n_clean_test"], runs[name]["metrics"]["n_triggered_test"]) == (n, n)
    assert runs["onion"]["config"]["victim"].endswith("victims/" + runs["finetune"]["id"][:16])
    victim_score = runs["onion"]["metrics"]["victim_on_onion_test"]
    assert 0 <= victim_score["cacc"] <= 1 and 0 <= victim_score["asr"] <= 1
    cell = RunConfig(dataset="sst2", attack="badnets", train_size=64, seed=3)
    assert trained[0] == cell.build_attack().apply(cell.benchmark()).train.texts
