"""The benchmark scripts refuse bad input as the command line does: one line, exit code 2, before any training."""

from __future__ import annotations

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
