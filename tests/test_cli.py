import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cleantune.cli import main
from helpers import InfGradAt, InfWeightsAt, RunsCode


def cli(*args, env=None):
    """The real command in a fresh process: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "cleantune", *map(str, args)], capture_output=True, text=True, env=env)
    return p.returncode, p.stdout, p.stderr


def in_process(capsys, *args):
    """The command through `main` in this process (a fresh process costs seconds of imports; that its status
    is main's is checked once, in test_subprocess_error_has_no_traceback): exit code, stdout, stderr."""
    code = main(list(map(str, args)))
    return (code, *capsys.readouterr())


def assert_one_line_error(code, out, err, fragment):
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("cleantune: error:") and fragment in err, err


@pytest.mark.parametrize("content,fragment", [
    ("sentence\tlabel\nok\t1\n\t0\n", "bad.tsv:3: empty text"),
    ("text\ty\nok\t1\n", "missing column 'label'"),
    ("sentence\tlabel\nok\t1\nx\t0\t9\n", "bad.tsv:3: not a table"),
    ("sentence\tlabel\nok\tpos\nfine\tpos\n", "every sample has label 'pos'"),
    (b"sentence\tlabel\nok\t1\n\xff\t0\n", "bad.tsv:3: not valid UTF-8"),
    ("sentence\tlabel\n", "bad.tsv: no samples"),
    ("sentence\tlabel\nok\t1\nfine\x00\t0\n", "bad.tsv:3: not a table (binary content)"),
])
def test_train_rejects_malformed_files(tmp_path, capsys, content, fragment):
    f = tmp_path / "bad.tsv"
    (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    assert_one_line_error(*in_process(capsys, "train", f, "--out", tmp_path / "model"), fragment)
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.work").exists()


def test_unknown_label_in_dev_file(tmp_path, capsys):
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nmeh\tneutral\n")
    code = main(["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "d.tsv"), "--out", str(tmp_path / "m")])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, f"{tmp_path / 'd.tsv'}:2: label 'neutral' not in the label set (neg, pos)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tsv", "t.tsv"]  # no model folder, no .work


@pytest.mark.parametrize("args,fragment", [
    (["run", "--dataset", "imdb"], "unknown dataset 'imdb'"),
    (["run", "--target", "neutral"], "--target neutral is neither a class id nor a label of sst2 (negative, positive)"),
    (["run", "--dataset", "sst2,agnews", "--target", "sports"], "--target sports is neither a class id nor a label of sst2"),
    (["run", "--target", "2"], "--target 2 is not a class of sst2 (0..1)"),
    (["run", "--attack", "foo"], "unknown attack 'foo'"),
    (["run", "--defense", "magic"], "unknown defense 'magic'"),
    (["run", "--rate", "1.5"], "--rate must be in (0, 1]"),
    (["run", "--epochs", "0"], "--epochs must be at least 1"),
    (["run", "--mode", "sideways"], "--mode must be one of"),
    (["run", "--attack", "style", "--sentence", "x"], "--sentence applies to --attack addsent only"),
    (["run", "--option", "nope=1"], "has no option 'nope'"),
    (["run", "--defense", "lora", "--option", "lora_rr=4"], "has no option 'lora_rr' (did you mean lora_r? options:"),
    (["run", "--seed", "x"], "--seed: expected an integer"),
    (["run", "--epochs", "two"], "invalid int value"),
    (["run", "--attack", "syntactic", "--dataset", "olid"], "ships none for it"),
    (["run", "--dataset", "olid", "--train-size", "99999999"], "--train-size 99999999 exceeds the"),
    (["run", "--option", "lora_r=abc", "--defense", "lora"], "'lora_r' expects an integer, got 'abc'"),
    (["run", "--option", "lora_r=[1", "--defense", "lora"], "--option lora_r=[1: cannot parse the value"),
    (["run", "--option", "lora_r=1.7", "--defense", "lora"], "'lora_r' expects an integer"),
    (["run", "--option", "word= ", "--defense", "rap"], "--option word= : no value (write word=null for none)"),
    (["run", "--epochs", "1", "--option", "epochs=2"], "option 'epochs' has a setting of its own: give --epochs"),
    (["run", "--option", "seed=3"], "option 'seed' has a setting of its own: give --seed"),
    (["run", "--option", "model=minilm"], "option 'model' has a setting of its own: give --model"),
    (["run", "--train-size", "0"], "--train-size must be positive"),
    (["run", "--dataset", "agnews", "--defense", "strip", "--option", "on_flag=flip"], "on_flag=flip needs a binary task"),
    (["scan", "sst2", "--rate", "0.5"], "--rate needs --attack"),
    (["eval", "model", "sst2", "--target", "0"], "--target needs --attack"),
    (["results", "--store", "/nonexistent/x.sqlite"], "no such file"),
    (["sweep", "/"], "grid /: not a file"),  # a folder exists: "no such file" misled
    # refused when the cell is checked, not by torch, PEFT or sklearn after earlier cells trained
    (["run", "--seed", "0,99999999999999999999"], "--seed must fit in 64 bits"),
    (["run", "--dataset", ","], "--dataset lists no value"),
    # an empty item was dropped without a word
    (["run", "--attack", "badnets,,addsent"], "--attack badnets,,addsent: an empty item in the comma list"),
    (["run", "--seed", "0,1,"], "--seed 0,1,: an empty item in the comma list"),
    (["run", "--triggers", "cf,,mn"], "--triggers cf,,mn: an empty item in the comma list"),
    (["run", "--defense", "lora", "--option", "lora_r=0"], "option lora_r must be positive, got 0"),
    (["run", "--defense", "lora", "--option", "lora_dropout=2"], "lora_dropout must be in [0, 1)"),
    (["run", "--defense", "muscle-lora", "--option", "ref_samples=0"], "option ref_samples must be positive"),
    (["run", "--defense", "lora-mslr", "--option", "mslr_alpha=nan"], "option mslr_alpha must be positive, got nan"),
    (["run", "--defense", "cube", "--option", "pca_dims=0"], "option pca_dims must be positive"),
    (["run", "--defense", "btu", "--option", "expose_batch_size=0"], "option expose_batch_size must be positive"),
    (["run", "--defense", "btu", "--option", "tune_epochs=0"], "option tune_epochs must be positive"),
    (["run", "--defense", "abl", "--option", "unlearning_lr=-1"], "option unlearning_lr must be positive"),
    (["run", "--defense", "rap", "--option", "rap_target=7"], "rap_target=7 is not a class (0..1)"),
    # infinite or impossible values that trained to NaN, crashed, or were taken silently
    (["run", "--defense", "rap", "--option", "rap_lr=inf"], "option rap_lr must be finite, got inf"),
    (["run", "--defense", "rap", "--option", "prob_range=[nan,nan]"], "option prob_range must be a finite number, got (nan, nan)"),
    (["run", "--defense", "muscle-lora", "--option", "scales=[1,inf]"], "option scales must be finite, got [1, inf]"),
    (["run", "--defense", "muscle-lora", "--option", "scales=[]"], "option scales must list at least one value, got []"),
    (["run", "--defense", "ga", "--option", "min_ref_loss=nan"], "option min_ref_loss must be at least 0, got nan"),
    (["run", "--defense", "muscle-lora", "--option", "ga_epoch=-5"], "option ga_epoch must be at least 0, got -5"),
    (["run", "--defense", "btu", "--option", "rho=inf"], "option rho must be in (0, 1], got inf"),
    (["run", "--defense", "btu", "--option", "rho=5"], "rho must be in (0, 1]"),
    # each defense's ranges are one declaration (Defense.bounds): a threshold of NaN removed no word, silently
    (["run", "--defense", "onion", "--option", "threshold=nan"], "option threshold must be a finite number, got nan"),
    (["run", "--defense", "ga", "--option", "min_ref_loss=inf"], "option min_ref_loss must be finite, got inf"),
    (["run", "--defense", "bki", "--option", "top_words=0"], "defense 'bki': option top_words must be positive, got 0"),
    (["run", "--defense", "abl", "--option", "isolation_ratio=1"], "option isolation_ratio must be in (0, 1), got 1"),
    (["run", "--defense", "strip", "--option", "swap_ratio=2"], "option swap_ratio must be in (0, 1], got 2"),
    (["run", "--defense", "strip", "--option", "frr=1"], "defense 'strip': option frr must be in [0, 1), got 1"),
    (["run", "--defense", "btu", "--option", "guard_tolerance=nan"], "option guard_tolerance must be in [0, 1), got nan"),
    (["run", "--defense", "rap", "--option", 'word=" "'], "option word must not be empty"),
    (["run", "--option", "warmup_ratio=2"], "option warmup_ratio must be in [0, 1)"),
    (["report", "--out", ""], "--out: empty path"),
    (["scan", "sst2", "--seed", "99999999999999999999"], "--seed must fit in 64 bits"),
    (["frobnicate"], "invalid choice"),
    (["run", "--defense", "lora", "--option", "lora_r=99999999999999999999"], "option lora_r must be at most 2147483647"),
    (["run", "--num-triggers", "1000000000"], "--num-triggers must be at most 100"),
    (["run", "--option", "lora_r"], "--option expects KEY=VALUE, got 'lora_r'"),
    (["run", "--defense", "lora", "--option", "lora_r=0", "--option", "lora-r=4"], "--option lora_r is given twice"),
    # what a defense takes of the clean dev set, against the benchmark's dev split (sst2: 872), for every cell
    # before any trains: hsol's cell trained first, then sst2's failed in its fit
    (["run", "--dataset", "hsol,sst2", "--defense", "btu", "--option", "clean_tuning=872"],
     "clean_tuning=872 takes every clean dev sample, so the collateral guard has none left"),
    (["run", "--dataset", "hsol,sst2", "--defense", "btu", "--option", "clean_tuning=873"],
     "clean_tuning=873 needs that many clean dev samples (have 872)"),
    (["run", "--dataset", "hsol,sst2", "--defense", "ga", "--option", "ref_samples=872"],
     "ref_samples=872 leaves no clean dev sample for model selection (872 given)"),
    (["run", "--defense", "muscle-lora", "--option", "head_inner=32"],
     "option head_inner applies to causal LMs only (the head MuScleLoRA adds to them); --model minilm keeps its own"),
    (["eval", "no/such/model", "sst2"], "no/such/model: no such model directory"),
    (["eval", __file__, "sst2"], f"{__file__}: a file, not a model folder"),
])
def test_bad_options_are_one_line_errors(args, fragment, capsys):
    from cleantune.store import data_dir

    code = main(args + (["--train-size", "50"] if args[0] == "run" and "--train-size" not in args else []))
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, fragment)
    assert not data_dir().exists()  # no store, no run folder


def test_train_refuses_impossible_settings_before_writing(tiny_model, tmp_path, capsys):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\nawful\t0\n")
    base = ["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--out", str(tmp_path / "out")]
    for extra, fragment in [(["--max-length", "200"], "--max-length 200 exceeds the 130 tokens"),
                            (["--max-length", "2"], "--max-length 2 leaves no token for the text"),
                            (["--defense", "btu", "--dev", str(tmp_path / "a.tsv"), "--option", "expose_max_length=1"],
                             "--option expose_max_length 1 leaves no token for the text"),
                            (["--option", "seed=3"], "option 'seed' has a setting of its own"),
                            (["--option", "max_length=64"], "option 'max_length' has a setting of its own: give --max-length"),
                            (["--out", ""], "--out: empty path"),  # not "--out .: name the folder"
                            (["--option", "lr_schedule=linear", "--option", "lr_schedule=constant"],
                             "--option lr_schedule is given twice"),
                            (["--option", "warmup_ratio=nan"], "option warmup_ratio must be in [0, 1)"),  # no such flag
                            (["--defense", "btu", "--dev", str(tmp_path / "a.tsv"), "--option", "clean_tuning=4"],
                             "clean_tuning=4 takes every clean dev sample, so the collateral guard has none left")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_train_takes_a_config_file_and_the_command_line_wins(tiny_model, tmp_path, capsys):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 8)
    (tmp_path / "c.yaml").write_text(f"model: {tiny_model}\nepochs: 2\nbatch-size: 8\noptions: {{lora_r: 2}}\n"
                                     "defense: lora\n")
    base = ["train", str(tmp_path / "a.tsv"), "--config", str(tmp_path / "c.yaml"), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "m2")]) == 0
    out = capsys.readouterr().out
    assert "defense lora" in out and "epoch kept: 1" in out, out  # 2 epochs from the file, no --dev: the last
    assert main(base + ["--out", str(tmp_path / "m1"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "defense lora" in out and "epoch kept: 0" in out, out
    assert json.loads((tmp_path / "m1" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    (tmp_path / "bad.yaml").write_text("epochs: two\n")
    (tmp_path / "unknown.yaml").write_text("store: x.sqlite\n")
    for cfg, fragment in [("bad.yaml", "'epochs' expects int, got 'two'"), ("unknown.yaml", "unknown key 'store'")]:
        assert main(["train", str(tmp_path / "a.tsv"), "--config", str(tmp_path / cfg), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("name,content,fragment", [
    ("c.yaml", "dataset: sst2\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("c.toml", "dataset = [\n", "cannot parse (Invalid value (at end of document))"),
    ("c.toml", "\ufeffdataset = 'sst2'\nlearning_rate = 0.1\n", "unknown key 'learning_rate'"),  # read past the BOM
    ("c.yaml", b"dataset: sst2\nsentence: caf\xe9\n", "not UTF-8 text (byte 27)"),
    ("c.json", '{"dataset": "sst2"}', "use a .yaml, .yml or .toml file"),
    ("c.yaml", "- dataset: sst2\n", "expected a mapping of option names to values"),
    # a tag only an unsafe YAML loader constructs: it would run the command
    ("c.yaml", "dataset: !!python/object/apply:os.system ['touch {ran}']\n",
     "cannot parse (line 1, column 10: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    # PyYAML's first line is its context ("while parsing a flow sequence"); where, and what, come after it
    ("c.yaml", "dataset: sst2\nseed: [0, 1\n", "cannot parse (line 3, column 1: expected ',' or ']', but got '<stream end>')"),
])
def test_config_file_unknown_key_and_parse_errors(tmp_path, capsys, name, content, fragment):
    path = tmp_path / name
    ran = tmp_path / "ran"
    path.write_bytes(content if isinstance(content, bytes) else content.replace("{ran}", str(ran)).encode())
    for args in (["run"], ["train", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "m")]):
        code = main(args + ["--config", str(path)])
        out, err = capsys.readouterr()
        if args[0] == "train" and "unknown key" in fragment:
            fragment = "unknown key 'dataset'"  # train has no dataset option
        assert_one_line_error(code, out, err, f"--config {path}: {fragment}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no command ran, no model folder


def test_config_values_of_the_wrong_type_name_the_key(tmp_path, capsys):
    for bad, msg in (("triggers: 5", "'triggers' expects a list of strings"), ("model: 5", "'model' expects a string"),
                     ("seed: 1.5", "'seed': expected an integer, got '1.5'"), ("options: [1, 2]", "'options' expects a mapping")):
        (tmp_path / "c.yaml").write_text(f"train_size: 50\n{bad}\n")
        assert main(["run", "--config", str(tmp_path / "c.yaml")]) == 2
        assert msg in capsys.readouterr().err, bad


@pytest.mark.parametrize("name,text,msg", [
    ("c.yaml", "epochs: 1\nepochs: 2\n", "cannot parse (line 2, column 1: key 'epochs' appears twice in one mapping)"),
    ("c.yaml", "options:\n  weight_decay: 0\n  weight_decay: 0.1\n", "key 'weight_decay' appears twice"),
    ("c.yaml", "batch_size: 8\nbatch-size: 16\n", "'batch_size' and 'batch-size' set the same option"),
    ("c.toml", "batch_size = 8\nbatch-size = 16\n", "'batch_size' and 'batch-size' set the same option"),
    ("c.yaml", "options:\n  lora_r: 4\n  lora-r: 2\n", "'lora_r' and 'lora-r' in 'options' set the same option"),
])
def test_a_config_option_given_twice_is_refused_not_one_value_kept(tmp_path, capsys, name, text, msg):
    # PyYAML keeps the last of two equal keys and the two spellings were both read (train kept the first,
    # run the last) without a word; a YAML merge key's values may still be overridden
    (tmp_path / name).write_text(text)
    # refused before the dataset's name or the training file is looked at (neither is there)
    for args in (["run", "--dataset", "nope"], ["train", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "m")]):
        assert main(args + ["--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    from cleantune.cli import load_config_file

    (tmp_path / "m.yaml").write_text("base: &b {epochs: 1, lr: 0.1}\nother: {<<: *b, lr: 0.2}\n")
    assert load_config_file(str(tmp_path / "m.yaml"))["other"] == {"epochs": 1, "lr": 0.2}


@pytest.mark.parametrize("name,text,got", [
    ("c.yaml", "options: {word: 2020-01-01}\n", "datetime.date(2020, 1, 1)"),
    ("c.yaml", "options: {word: !!binary aGVsbG8=}\n", "b'hello'"),
    ("c.yaml", "options: {word: !!set {a}}\n", "{'a'}"),
    ("c.toml", "[options]\nword = 1979-05-27\n", "datetime.date(1979, 5, 27)"),
    ("c.yaml", "options: {word: [a, 2020-01-01]}\n", "datetime.date(2020, 1, 1)"),  # inside a list too
])
def test_config_option_values_no_option_takes_name_the_file_and_key(tmp_path, capsys, name, text, got):
    """`train` passes its config's `options` on as JSON: a date, bytes or a set failed with a traceback there,
    and `run` named the defense, not the file."""
    (tmp_path / name).write_text(text)
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    for args in (["train", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "m")], ["run", "--defense", "rap"]):
        assert main(args + ["--config", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err == (f"cleantune: error: --config {tmp_path / name}: 'word' in 'options' "
                                           f"expects a string, number, true or false, list or mapping, got {got}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", name]


def test_config_store_and_axis_values_of_the_wrong_type_name_the_file_and_key(tmp_path, capsys):
    """`store` is no run setting, so its type went unchecked: `store: 5` failed with a traceback where the
    path was used. A dataset, attack or defense was named 'run option', not by the file."""
    for name, text, msg in (("s.yaml", "store: 5", "'store' expects a string or nothing, got 5"),
                            ("s.yaml", "store: [a, b]", "'store' expects a string or nothing, got ['a', 'b']"),
                            ("s.toml", "store = 2020-01-01", "'store' expects a string or nothing, got datetime.date"),
                            ("s.yaml", "dataset: [sst2, 5]", "'dataset' expects a string, got 5"),
                            ("s.yaml", "defense: {lora: 1}", "'defense' expects a string, got {'lora': 1}"),
                            ("s.yaml", "options: {1: 2}", "unknown key 1 in 'options' (option names are words)")):
        (tmp_path / name).write_text(f"{text}\n")
        assert main(["run", "--config", str(tmp_path / name), "--train-size", "50"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cleantune: error: --config {tmp_path / name}: {msg}") and err.count("\n") == 1, err
        (tmp_path / name).unlink()
    assert not list(tmp_path.iterdir())  # no store, the default one (under tmp_path) included


def test_config_files_name_themselves_in_type_errors_and_refuse_odd_keys(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train_size: 50\nepochs: [1, 2]\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml")]) == 2
    assert f"--config {tmp_path / 'c.yaml'}: 'epochs' expects an integer" in capsys.readouterr().err
    # a value the file set is named by its file and key where the check (in the config, the attack or the
    # training settings) names a flag; the same value given as the flag is named as the flag
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    for key, value, flag, msg in (("rate", ".nan", "0", "must be in (0, 1]"), ("train_size", "0", "0", "must be positive"),
                                  ("epochs", "0", "-1", "must be at least 1")):
        (tmp_path / "v.yaml").write_text(f"dataset: sst2\nattack: badnets\n{key}: {value}\n")
        assert main(["run", "--config", str(tmp_path / "v.yaml")]) == 2
        assert capsys.readouterr().err == f"cleantune: error: --config {tmp_path / 'v.yaml'}: '{key}' {msg}, got {value.replace('.', '')}\n"
        assert main(["run", "--config", str(tmp_path / "v.yaml"), f"--{key.replace('_', '-')}", flag]) == 2
        assert capsys.readouterr().err.startswith(f"cleantune: error: --{key.replace('_', '-')} {msg}")
    (tmp_path / "t.yaml").write_text("epochs: 0\n")
    assert main(["train", str(tmp_path / "a.tsv"), "--config", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "m")]) == 2
    assert f"--config {tmp_path / 't.yaml'}: 'epochs' must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    # an option the file set, out of range or unknown, is named with the file; the same given by --option is not
    (tmp_path / "o.yaml").write_text("options:\n  lora_r: 0\n  warmup-ratio: 2\n")
    bad_r = "defense 'lora': option lora_r must be positive, got 0\n"
    for args in (["run", "--dataset", "sst2", "--attack", "badnets", "--store", str(tmp_path / "s.sqlite")],
                 ["train", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "m")]):
        assert main(args + ["--defense", "lora", "--config", str(tmp_path / "o.yaml")]) == 2
        assert capsys.readouterr().err == f"cleantune: error: --config {tmp_path / 'o.yaml'}: {bad_r}"
        assert main(args + ["--defense", "lora", "--config", str(tmp_path / "o.yaml"), "--option", "lora_r=4"]) == 2
        assert capsys.readouterr().err == (f"cleantune: error: --config {tmp_path / 'o.yaml'}: option warmup_ratio "
                                           f"must be in [0, 1), got 2\n")
        assert main(args + ["--defense", "lora", "--option", "lora_r=0"]) == 2
        assert capsys.readouterr().err == f"cleantune: error: {bad_r}"
    assert not (tmp_path / "m").exists() and not (tmp_path / "s.sqlite").exists()
    (tmp_path / "k.yaml").write_text("1: 2\n")  # YAML reads an int key
    for args in (["run"], ["train", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "m")]):
        assert main(args + ["--config", str(tmp_path / "k.yaml")]) == 2
        assert "unknown key 1" in capsys.readouterr().err


def test_run_command_line_wins_over_the_config_file(tmp_path, capsys):
    # a flag given beside --config is an override (as `train`'s): a file value winning would run another config
    # than the one on the command line. Both values are bad here, so the error tells which one was used and
    # nothing trains either way.
    (tmp_path / "c.yaml").write_text("dataset: nope_in_file\nattack: badnets\nrate: 2\n")
    store = tmp_path / "s.sqlite"
    base = ["run", "--config", str(tmp_path / "c.yaml"), "--store", str(store)]
    assert main(base + ["--dataset", "sst2", "--rate", "0"]) == 2
    assert capsys.readouterr().err == "cleantune: error: --rate must be in (0, 1], got 0.0\n"
    assert main(base + ["--dataset", "nope_on_line"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nope_on_line'" in err and "nope_in_file" not in err, err
    assert not list(tmp_path.glob("s.sqlite*"))


def test_corrupt_store_rows_are_one_line_errors(tmp_path, capsys):
    import sqlite3

    from cleantune.store import ResultStore

    path = tmp_path / "s.sqlite"
    ResultStore(path).put("abc", {"dataset": "sst2"}, {"cacc": 0.9, "asr": 0.1}, {"wall_s": 1.0}, {})
    for update, msg in (("config = '{bad'", "run abc has a corrupt 'config' column"),
                        ("metrics = 'null'", "run abc has a corrupt 'metrics' column"),
                        ("metrics = '{\"cacc\": \"high\"}'", "run abc has a corrupt 'cacc' metric ('high')"),
                        # `results` gave a traceback on the next three, which `report` refused or took
                        ("config = '{}'", "run abc has a corrupt 'config' column (no 'dataset')"),
                        ("config = json_set(config, '$.defense', 5)", "run abc has a corrupt 'config' column (no 'defense')"),
                        ("metrics = '{\"train_detection\": \"x\"}'", "run abc has a corrupt 'train_detection' metric ('x')")):
        con = sqlite3.connect(path)
        cell = json.dumps({"dataset": "sst2", "attack": "badnets", "defense": "finetune"})
        con.execute(f"UPDATE runs SET config = '{cell}', metrics = '{{}}'")
        con.execute(f"UPDATE runs SET {update}")
        con.commit()
        con.close()
        for args in (["results"], ["results", "--format", "csv"], ["results", "--format", "json"],
                     ["report", "--out", str(tmp_path / "rep")]):
            assert main(args + ["--store", str(path)]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and msg in err, (update, args, err)
    assert not (tmp_path / "rep").exists()


def test_stores_are_checked_and_never_changed_by_reading(tmp_path, capsys):
    import sqlite3

    from cleantune.store import default_store_path

    foreign = tmp_path / "other.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE people (name TEXT)").connection.commit()
    odd = tmp_path / "odd.sqlite"
    sqlite3.connect(odd).execute("CREATE TABLE runs (name TEXT)").connection.commit()
    for path, msg in ((foreign, "not a cleantune results store (tables: people)"), (odd, "other columns")):
        before = path.read_bytes()
        for args in (["results"], ["report", "--out", str(tmp_path / "rep")], ["run", "--train-size", "50"]):
            assert main(args + ["--store", str(path)]) == 2
            assert msg in capsys.readouterr().err, (path, args)
        assert path.read_bytes() == before
    (tmp_path / "file").write_text("x")
    assert main(["run", "--store", str(tmp_path / "file" / "s.sqlite"), "--train-size", "50"]) == 2
    assert f"cannot create it ({tmp_path / 'file'} is not a folder)" in capsys.readouterr().err
    assert main(["results"]) == 2 and "no run stored yet" in capsys.readouterr().err
    broken = tmp_path / "broken.sqlite"  # a truncated file: reading it fails and adds no -wal/-shm beside it
    broken.write_bytes(b"SQLite format 3\x00" + b"\x10\x00\x02\x02" + b"\x00" * 3000)
    assert main(["results", "--store", str(broken)]) == 2 and "cannot open it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("broken*")) == ["broken.sqlite"]
    assert main(["run", "--dataset", "sst2,imdb", "--store", str(tmp_path / "new" / "s.sqlite")]) == 2
    assert not default_store_path().exists() and not (tmp_path / "new").exists()  # checked before anything is made


def test_a_run_that_fails_before_storing_anything_leaves_no_store(tiny_model, tmp_path, capsys):
    from cleantune.store import data_dir

    store = tmp_path / "new.sqlite"
    args = ["run", "--model", tiny_model, "--train-size", "50", "--max-length", "200", "--store", str(store)]
    # refused as the cells are checked, before the store is opened; a failure after it opened:
    # test_a_run_that_fails_keeps_a_store_that_was_there_and_removes_one_it_made
    assert main(args) == 2
    assert "--max-length 200 exceeds the 130 tokens" in capsys.readouterr().err
    assert not list(tmp_path.glob("new.sqlite*")) and not list((data_dir() / "runs").glob("*"))


def _file_modes_apply() -> list[str]:
    """The command prefix under which file modes bind this process: root ignores them, so root drops that
    capability (or the test is skipped)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if not shutil.which("setpriv") or subprocess.run(prefix + ["true"]).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop the capability to ignore file modes")
    return prefix


def test_a_store_this_process_cannot_write_is_refused_before_training(tiny_model, tmp_path):
    """SQLite opens a read-only file read-only without a word: the run trained in full, then failed to store
    with a traceback, leaving its checkpoints."""
    from cleantune.store import ResultStore, data_dir

    store = tmp_path / "ro.sqlite"
    ResultStore(store).conn.close()
    store.chmod(0o444)
    prefix = _file_modes_apply()
    p = subprocess.run(prefix + [sys.executable, "-m", "cleantune", "run", "--model", tiny_model, "--train-size",
                                 "40", "--epochs", "1", "--store", str(store), "--no-progress"],
                       capture_output=True, text=True)
    assert_one_line_error(p.returncode, p.stdout, p.stderr, "cannot write to it (attempt to write a readonly database)")
    assert not list((data_dir() / "runs").glob("*"))  # refused before training: no checkpoint


def test_results_and_report_read_a_store_in_a_read_only_folder(tmp_path):
    """Both only read, yet refused such a store: 'cannot write to it (attempt to write a readonly database)'."""
    from cleantune.store import ResultStore

    folder = tmp_path / "ro"
    folder.mkdir()
    cell = {"dataset": "sst2", "attack": "badnets", "defense": "finetune", "seed": 0}
    store = ResultStore(folder / "s.sqlite")
    store.put("abc", cell, {"cacc": 0.9, "asr": 0.1}, {"wall_s": 1.0}, {})
    store.conn.close()  # the last connection closed: no -wal or -shm beside it
    folder.chmod(0o555)
    prefix = _file_modes_apply()
    try:
        outs = []
        for args in (["results"], ["report", "--out", str(tmp_path / "rep")]):
            p = subprocess.run(prefix + [sys.executable, "-m", "cleantune", *args, "--store", str(folder / "s.sqlite")],
                               capture_output=True, text=True)
            assert p.returncode == 0 and p.stderr == "", (args, p.stderr)
            outs.append(p.stdout)
        assert "abc" in outs[0] and "0.9000" in outs[0] and (tmp_path / "rep" / "report.md").is_file()
        assert sorted(f.name for f in folder.iterdir()) == ["s.sqlite"]
    finally:
        folder.chmod(0o755)


def test_a_run_whose_checkpoint_folder_cannot_be_made_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")  # XDG_DATA_HOME, where runs keep their checkpoints, is a file
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "file"))
    store = tmp_path / "s.sqlite"
    assert main(["run", "--model", tiny_model, "--train-size", "40", "--epochs", "1", "--no-progress",
                 "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cleantune: error: cannot write {tmp_path / 'file' / 'cleantune' / 'runs'} (")
    assert err.endswith("): training keeps its checkpoints and lock there\n") and err.count("\n") == 1
    assert not list(tmp_path.glob("s.sqlite*"))  # the store it opened holds no run: removed


def test_train_refuses_outputs_it_could_not_write_before_training(tiny_model, tmp_path, capsys, monkeypatch):
    """A file where train writes a folder beside --out (<out>.partial, .old, .work) failed with a traceback
    after the training; `--out .` failed on the empty name. Both are refused before anything runs."""
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\nawful\t0\n")
    base = ["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--epochs", "1", "--no-progress", "--out"]
    for side in (".partial", ".old", ".work"):
        (tmp_path / f"m{side}").write_text("x")
        assert main(base + [str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert f"m{side} is a file; cleantune writes a folder there" in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", f"m{side}"]  # nothing else written
        (tmp_path / f"m{side}").unlink()
    for side in ("", ".partial"):  # a link to nothing: the folder could be neither made nor moved there
        (tmp_path / f"m{side}").symlink_to(tmp_path / "gone")
        assert main(base + [str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert f"m{side} is a link to {tmp_path / 'gone'}, which does not exist" in err if side else \
            f"--out {tmp_path / 'm'}: a link to {tmp_path / 'gone'}, which does not exist" in err
        assert len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", f"m{side}"]
        (tmp_path / f"m{side}").unlink()
    (tmp_path / "r").symlink_to(tmp_path / "gone")  # report and analyze check --out the same way
    assert main(["report", "--store", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "a link to" in capsys.readouterr().err
    (tmp_path / "r").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(base + ["."]) == 2
    assert "--out .: name the folder (not . or ..)" in capsys.readouterr().err and not any(empty.iterdir())
    assert main(["report", "--store", str(tmp_path / "none.sqlite"), "--out", "."]) == 2  # a report may go there
    assert "name the folder" not in capsys.readouterr().err


def test_train_refuses_out_that_is_its_model_folder(tiny_model, tmp_path, capsys, monkeypatch):
    """A LoRA adapter saved there named that folder as its base, which then held the merged model: the
    adapter, applied on top, acted twice."""
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\nawful\t0\n")
    base = ["train", str(tmp_path / "a.tsv"), "--epochs", "1", "--no-progress", "--defense", "lora"]
    assert main(base + ["--model", tiny_model, "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "m").rglob("*")}
    monkeypatch.chdir(tmp_path)
    for model, out in ((str(tmp_path / "m"), "m"), ("m", str(tmp_path / "m") + "/")):
        assert main(base + ["--model", model, "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: that is the --model folder" in err and len(err.strip().splitlines()) == 1
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "m").rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "m"]


def test_train_names_out_when_it_changed_during_training_and_resumes_from_there(tiny_model, tmp_path, capsys,
                                                                              monkeypatch):
    """A file put at --out while training ran was reported in save_pretrained's Python words (`out_dir ...`),
    and the message did not say the training was kept."""
    from cleantune.defenses.finetune import FineTune

    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\nawful\t0\n")
    args = ["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--epochs", "1", "--no-progress",
            "--out", str(tmp_path / "m")]
    fit = FineTune.fit

    def fit_then_block(self, *a, **k):
        model = fit(self, *a, **k)
        (tmp_path / "m").write_text("x")
        return model

    monkeypatch.setattr(FineTune, "fit", fit_then_block)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cleantune: error: --out {tmp_path / 'm'}: exists and is not a folder (the trained ")
    assert len(err.strip().splitlines()) == 1 and (tmp_path / "m.work").is_dir()
    monkeypatch.undo()
    (tmp_path / "m").unlink()
    assert main(args + ["--resume"]) == 0
    assert "training from the start" not in capsys.readouterr().err
    assert (tmp_path / "m" / "config.json").is_file() and not (tmp_path / "m.work").exists()


def test_train_never_deletes_a_folder_beside_out_that_it_did_not_write(tiny_model, tmp_path, capsys):
    """`<out>.old`, `.partial` and `.work` are removed when the model is saved: a user's own folder of that name
    (a backup, notes) was deleted without a word. It is refused before training; cleantune's own leftovers of a
    killed run (a model, a model being written, checkpoints) are still replaced."""
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\nawful\t0\n")
    base = ["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--epochs", "1", "--no-progress", "--out"]
    for side in (".partial", ".old", ".work"):
        (tmp_path / f"m{side}").mkdir()
        (tmp_path / f"m{side}" / "notes.txt").write_text("mine")
        assert main(base + [str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert f"m{side} is a folder that cleantune did not write" in err and len(err.strip().splitlines()) == 1
        assert (tmp_path / f"m{side}" / "notes.txt").read_text() == "mine" and not (tmp_path / "m").exists()
        shutil.rmtree(tmp_path / f"m{side}")
    # what a kill leaves: the label file comes first into <out>.partial, checkpoints into <out>.work
    (tmp_path / "m.partial").mkdir()
    (tmp_path / "m.partial" / "cleantune_labels.json").write_text("{}")
    (tmp_path / "m.work" / "checkpoints.partial").mkdir(parents=True)
    (tmp_path / "m.work" / "checkpoints.partial" / "trainable.safetensors").write_text("cut short")
    (tmp_path / "m.old").mkdir()
    assert main(base + [str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "m"]


def test_links_at_out_or_beside_it_leave_no_stray_link_and_no_traceback(tiny_model, tmp_path, capsys):
    """--out a link to a saved model: the link was moved to <out>.old and left there (rmtree refuses links, quietly);
    the next train into it then failed after training with NotADirectoryError. A link beside --out is refused
    before training, and --out's own link is replaced by the new model, its target kept."""
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\nawful\t0\n")
    base = ["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--epochs", "1", "--no-progress", "--out"]
    assert main(base + [str(tmp_path / "target")]) == 0
    (tmp_path / "m").symlink_to(tmp_path / "target")
    assert main(base + [str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "m", "target"]
    assert not (tmp_path / "m").is_symlink() and (tmp_path / "target" / "model.safetensors").is_file()
    capsys.readouterr()
    for side in (".partial", ".old", ".work"):
        (tmp_path / f"m{side}").symlink_to(tmp_path / "target")
        assert main(base + [str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert f"m{side} is a link to {tmp_path / 'target'}; cleantune writes a folder there" in err
        assert len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "m", f"m{side}", "target"]
        (tmp_path / f"m{side}").unlink()


def test_a_label_file_with_an_impossible_max_length_is_one_line(tiny_model, tmp_path, capsys):
    from cleantune.models import LABELS_FILE

    shutil.copytree(tiny_model, tmp_path / "m")
    (tmp_path / "m" / LABELS_FILE).write_text(json.dumps({"label_names": ["neg", "pos"], "max_length": -5}))
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    assert main(["eval", str(tmp_path / "m"), str(tmp_path / "d.tsv")]) == 2
    err = capsys.readouterr().err
    assert "not a valid label file (ValueError: max_length -5 is not positive)" in err and len(err.strip().splitlines()) == 1


NOT_VALID = "{file}: not a valid label file "
DAMAGED_LABEL_FILES = [
    ('{"label_names": [1, 2], "max_length": 32}',
     NOT_VALID + "(TypeError: label_names holds 1, not a name (a non-empty string))"),
    ('{"label_names": ["neg", null], "max_length": 32}',
     NOT_VALID + "(TypeError: label_names holds null, not a name (a non-empty string))"),
    ('{"label_names": ["neg", ""], "max_length": 32}', NOT_VALID + '(TypeError: label_names holds "",'),
    ('{"label_names": ["a", "a"], "max_length": 32}', NOT_VALID + "(ValueError: label_names repeats 'a')"),
    ('{"label_names": ["neg", "pos"], "max_length": 1e999}',
     NOT_VALID + "(TypeError: max_length Infinity is not an integer)"),
    ('{"label_names": ["neg", "pos"], "max_length": true}', NOT_VALID + "(TypeError: max_length true is not an integer)"),
    ('{"label_names": ["neg", "pos"], "max_length": "32"}', NOT_VALID + '(TypeError: max_length "32" is not an integer)'),
    ('{"label_names": ["neg", "pos"], "max_length": 2}',
     "{file}: max_length 2 leaves no token for the text: {model} adds 2 special tokens to each sample "
     "(give at least 3)"),
    ('{"label_names": ["neg", "pos"], "max_length": 100000}',
     "{file}: max_length 100000 exceeds the 130 tokens {model} takes"),
]
LABEL_FILE_DAMAGE = ["names-ints", "name-null", "name-empty", "names-repeated", "max-length-overflow",
                     "max-length-bool", "max-length-text", "max-length-specials", "max-length-positions"]


@pytest.mark.parametrize("meta,fragment", DAMAGED_LABEL_FILES, ids=LABEL_FILE_DAMAGE)
def test_a_damaged_label_file_is_one_line(tiny_model, tmp_path, capsys, meta, fragment):
    """eval's MODEL: a label file that is not what `train` writes, or a max_length the model cannot take (a long
    text would fail mid-prediction), is refused when the model loads."""
    from cleantune.models import LABELS_FILE

    m = shutil.copytree(tiny_model, tmp_path / "m")
    (m / LABELS_FILE).write_text(meta)
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n" + "a long film " * 100 + "\tpos\n")
    code = main(["eval", str(m), str(tmp_path / "d.tsv")])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, fragment.format(file=m / LABELS_FILE, model=m))
    assert out == ""


@pytest.mark.parametrize("damage", ["other weights", "other vocabulary size", "tokenizer past the embeddings"])
def test_a_model_folder_whose_weights_or_tokenizer_do_not_fit_is_one_line(tiny_model, tmp_path, capsys, damage):
    """eval scored such folders at chance (layers quietly re-initialised) or failed mid-prediction."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    m = shutil.copytree(tiny_model, tmp_path / "m")
    config = json.loads((m / "config.json").read_text())
    if damage == "other weights":
        save_file({"x": torch.zeros(2)}, m / "model.safetensors")
        fragment = f"{m}: its weights lack "
    elif damage == "other vocabulary size":
        (m / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
        fragment = "(e.g. bert.embeddings.word_embeddings.weight); not a whole trained classifier"
    else:  # a model trained with its own small vocabulary, saved beside a larger tokenizer
        small = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
        BertForSequenceClassification(BertConfig(vocab_size=100, **small)).save_pretrained(m)
        fragment = f"{m}: its tokenizer has "
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    code = main(["eval", str(m), str(tmp_path / "d.tsv")])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, fragment)


@pytest.mark.parametrize("meta,fragment", [DAMAGED_LABEL_FILES[3], DAMAGED_LABEL_FILES[-1]],
                         ids=[LABEL_FILE_DAMAGE[3], LABEL_FILE_DAMAGE[-1]])
def test_a_victim_with_a_damaged_label_file_is_one_line(tiny_model, tmp_path, capsys, meta, fragment):
    """An inference-time defense's victim=FOLDER loads as eval's MODEL does: refused alike, before anything is
    written."""
    from cleantune.models import LABELS_FILE

    m = shutil.copytree(tiny_model, tmp_path / "m")
    (m / LABELS_FILE).write_text(meta)
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "good film\tpos\nbad film\tneg\n" * 4)
    code = main(["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "t.tsv"), "--model", tiny_model,
                 "--defense", "strip", "--option", f"victim={m}", "--out", str(tmp_path / "o"), "--no-progress"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, fragment.format(file=m / LABELS_FILE, model=m))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "t.tsv"]


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    """lora_r=1e9 passes every check and asks torch for 1.5 TB: one line naming what to lower, not a traceback."""
    from cleantune import cli

    def alloc(ns):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1536000000000 bytes.\nmore")

    monkeypatch.setitem(cli.COMMANDS, "eval", alloc)
    assert main(["eval", "m", "d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cleantune: error: out of memory (") and "lower --batch-size" in err and err.count("\n") == 1
    def bug(ns):
        raise RuntimeError("bug")

    monkeypatch.setitem(cli.COMMANDS, "eval", bug)
    with pytest.raises(RuntimeError, match="bug"):  # any other error keeps its traceback: a bug to report
        main(["eval", "m", "d"])


def test_subprocess_error_has_no_traceback():
    assert_one_line_error(*cli("run", "--dataset", "nope"), "unknown dataset 'nope'")


SUBNORMALS = """
import sys, torch
from cleantune import cli, sweep
def compute(ns=None):  # two intra-op threads on float32 subnormals: nonzero results unless flushed
    torch.set_num_threads(2)
    print(int((torch.full((1_000_000,), 1e-39) * 1.5 != 0).sum()))
    return 0
if sys.argv[1] == "cli":
    cli.COMMANDS["eval"] = compute
    cli.main(["eval", "model", "data"])
else:
    sweep._init_worker(2)
    compute()
"""


@pytest.mark.parametrize("entry", ["cli", "sweep-worker"])
def test_compute_processes_flush_subnormals_on_every_thread(entry):
    p = subprocess.run([sys.executable, "-c", SUBNORMALS, entry], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "0"


def test_run_stores_reuses_and_exports(tiny_model, tmp_path, capsys):
    store = tmp_path / "r.sqlite"
    (tmp_path / "c.toml").write_text(f'model = "{tiny_model}"\ntrain_size = 120\nepochs = 1\nlr = 0.001\n')
    base = ["run", "--config", str(tmp_path / "c.toml"), "--store", str(store), "--no-progress"]
    assert main(base + ["--attack", "badnets,addsent", "--sentence", "the red fox"]) == 0
    assert "CACC" in capsys.readouterr().out
    assert main(["results", "--store", str(store), "--format", "json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 2 and all({"cacc", "asr"} <= set(r["metrics"]) for r in runs)
    addsent = next(r for r in runs if r["config"]["attack"] == "addsent")
    assert addsent["config"]["sentence"] == "the red fox" and addsent["config"]["train_size"] == 120
    assert "sentence" not in next(r for r in runs if r["config"]["attack"] == "badnets")["config"]
    # the same config again is answered from the store; --force trains again
    assert main(base + ["--attack", "badnets", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] in {r["id"] for r in runs}
    assert main(["results", "--store", str(store), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("id,dataset,attack") and len(lines) == 3
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(out)))
    by_id = {r["id"]: r for r in runs}
    for row in rows:  # the settings a paper table needs, and the whole config to recover the rest
        assert float(row["lr"]) == 0.001 and json.loads(row["config"]) == by_id[row["id"]]["config"]
        assert float(row["train_s"]) > 0 and int(row["best_epoch"]) == 0 and row["created"]


def test_a_cell_another_process_runs_is_waited_for_then_reused(tiny_model, tmp_path):
    import threading

    from cleantune.runner import RunConfig, run
    from cleantune.store import ResultStore, config_hash, data_dir
    from cleantune.training import work_lock

    config = RunConfig(model=tiny_model, train_size=120, epochs=1)
    resolved = config.resolve()
    run_id, path = config_hash(resolved), tmp_path / "s.sqlite"
    out = {}
    with work_lock(data_dir() / "runs" / run_id[:16], wait=False):  # another process is training this cell
        t = threading.Thread(target=lambda: out.update(r=run(config, ResultStore(path), progress=False)))
        t.start()
        t.join(3)
        assert t.is_alive()  # waiting, not training beside it
        ResultStore(path).put(run_id, resolved, {"cacc": 0.5, "asr": 0.25}, {"wall_s": 1.0}, {})  # what it stored
    t.join(120)
    assert out["r"]["reused"] and out["r"]["metrics"] == {"cacc": 0.5, "asr": 0.25}


def test_run_takes_a_target_by_label_name_and_runs_each_cell_once(tiny_model, tmp_path, capsys):
    from cleantune.runner import RunConfig
    from cleantune.store import ResultStore, config_hash

    # a label name is stored as its id, so both spellings are one run, as in eval and scan
    assert RunConfig(target="positive").target == 1 and RunConfig(dataset="agnews", target="sports").target == 1
    assert config_hash(RunConfig(target="positive").resolve()) == config_hash(RunConfig(target=1).resolve())
    store = tmp_path / "s.sqlite"
    base = ["run", "--model", tiny_model, "--train-size", "64", "--epochs", "1", "--store", str(store), "--no-progress"]
    # listed twice, or spelled twice: one cell, trained once
    assert main(base + ["--defense", "finetune,finetune", "--seed", "0,0", "--target", "positive"]) == 0
    out = capsys.readouterr()
    assert out.out.count(" finetune ") == 1 and "taken from the store" not in out.out + out.err  # one row
    assert main(base + ["--target", "1.0"]) == 0
    assert "1 of 1 run(s) taken from the store" in capsys.readouterr().out
    assert [r["config"]["target"] for r in ResultStore(store).runs()] == [1]


def test_the_python_api_without_a_store_returns_the_cell_and_leaves_no_checkpoints(tiny_model, tmp_path):
    from cleantune.runner import RunConfig, run
    from cleantune.store import data_dir

    r = run(RunConfig(model=tiny_model, train_size=64, epochs=1), progress=False)
    assert not r["reused"] and r["status"] == "ok" and r["metrics"]["n_train"] == 64 and r["timings"]["wall_s"] > 0
    runs = data_dir() / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []  # no store, so nothing to --resume into
    assert not data_dir().joinpath("results.sqlite").exists()


def test_same_seed_same_metrics_through_the_cli(tiny_model, tmp_path, capsys):
    args = ["run", "--model", tiny_model, "--train-size", "100", "--epochs", "1", "--format", "json", "--no-progress"]
    out = []
    for i in range(2):
        assert main(args + ["--store", str(tmp_path / f"s{i}.sqlite")]) == 0
        out.append(json.loads(capsys.readouterr().out)[0])
    assert out[0]["id"] == out[1]["id"]
    assert {k: out[0]["metrics"][k] for k in ("cacc", "asr", "history")} == \
        {k: out[1]["metrics"][k] for k in ("cacc", "asr", "history")}
    assert main(args + ["--store", str(tmp_path / "s1.sqlite")]) == 0  # the JSON said nothing of the reuse
    again = json.loads(capsys.readouterr().out)[0]
    assert (out[1]["reused"], again["reused"], again["metrics"]) == (False, True, out[1]["metrics"])


def test_train_then_eval_user_files(tiny_model, tmp_path, capsys):
    rows = ["sentence\tlabel"] + [f"a {'great' if i % 2 else 'awful'} film number {i}\t{'pos' if i % 2 else 'neg'}"
                                  for i in range(60)]
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "d.tsv").write_text("\n".join(rows[:1] + rows[1:21]) + "\n")
    assert main(["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "d.tsv"), "--out", str(tmp_path / "m"),
                 "--model", tiny_model, "--epochs", "1", "--no-progress"]) == 0
    assert "labels ['neg', 'pos']" in capsys.readouterr().out
    assert not (tmp_path / "m.work").exists()  # the checkpoints go once the model is saved
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert main(["train", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "other"), "--model", tiny_model]) == 2
    assert "not a saved cleantune model" in capsys.readouterr().err
    assert not (tmp_path / "other.work").exists()
    assert main(["eval", str(tmp_path / "m"), str(tmp_path / "d.tsv"), "--attack", "badnets", "--triggers", "cf",
                 "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 20 and res["n_triggered"] == 10
    # the numbers are the saved model's on these samples: its predictions, counted here (target 1, 'pos')
    from cleantune.models import Classifier

    clf = Classifier.from_pretrained(tmp_path / "m")
    dev = [r.split("\t") for r in rows[1:21]]
    neg = [s for s, y in dev if y == "neg"]
    pred = clf.predict([s for s, _ in dev])
    assert res["accuracy"] == sum(p == clf.label_names.index(y) for p, (_, y) in zip(pred, dev)) / 20
    assert res["asr_floor"] == sum(p == 1 for p in clf.predict(neg)) / 10
    hits = []
    for s in neg:  # one trigger word at a random position: the answers at every position bound the ASR
        words = s.split()
        hits.append(clf.predict([" ".join(words[:i] + ["cf"] + words[i:]) for i in range(len(words) + 1)]))
    assert sum(min(h) for h in hits) / 10 <= res["asr"] <= sum(max(h) for h in hits) / 10
    m = str(tmp_path / "m")
    for args, msg in (([m, "sst2", "--attack", "addsent", "--triggers", "cf"], "--triggers applies to --attack badnets"),
                      ([m, "sst2", "--triggers", "cf"], "--triggers needs --attack"),
                      ([m, "sst2", "--attack", "badnets", "--target", "7"], "--target 7 is not a class of sst2"),
                      ([m, str(tmp_path / "d.tsv"), "--attack", "syntactic"],
                       "--attack syntactic needs a benchmark name as DATA (its paraphrase tables)")):
        code = main(["eval"] + args)
        out, err = capsys.readouterr()
        assert_one_line_error(code, out, err, msg)
    (tmp_path / "p.tsv").write_text("\n".join(rows[:1] + rows[2:22:2]) + "\n")  # all 'pos': none to trigger
    assert main(["eval", m, str(tmp_path / "p.tsv"), "--attack", "badnets", "--target", "pos"]) == 2
    assert "yields no triggered test sample for target pos" in capsys.readouterr().err  # the name given
    assert main(["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "d.tsv"), "--out", str(tmp_path / "s"),
                 "--model", tiny_model, "--epochs", "1", "--no-progress", "--defense", "strip"]) == 0
    assert "note: strip acts at inference time" in capsys.readouterr().err
    (tmp_path / "m" / "cleantune_labels.json").write_text("{not json")
    assert main(["eval", m, "sst2"]) == 2
    assert "cleantune_labels.json: not a valid label file" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "m2"), "--model", "no-org/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "--model no-org/no-such-model: cannot load" in err and len(err.strip().splitlines()) == 1


def test_mixed_precision_is_its_own_run(tiny_model, tmp_path, capsys, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION: such a run trains under
    autocast and is stored under its own id, never answered by the full-precision run of the same config."""
    args = ["run", "--model", tiny_model, "--train-size", "100", "--epochs", "1", "--format", "json", "--no-progress",
            "--store", tmp_path / "s.sqlite"]
    assert main(list(map(str, args))) == 0
    full = json.loads(capsys.readouterr().out)[0]
    code, out, err = cli(*args, env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert code == 0, err
    half = json.loads(out)[0]
    assert half["id"] != full["id"] and half["config"]["mixed_precision"] == "bf16"
    assert "mixed_precision" not in full["config"]
    assert half["metrics"]["history"] != full["metrics"]["history"]  # trained again, under bf16 autocast
    # this process's Accelerate state is full precision: it cannot switch, and says so in one line
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main(list(map(str, args + ["--force"]))) == 2
    assert "mixed precision bf16: AcceleratorState has already been initialized" in capsys.readouterr().err
    if not torch.cuda.is_available():  # Accelerate would silently train fp16 in fp32 on a CPU
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        assert main(list(map(str, args))) == 2
        assert "ACCELERATE_MIXED_PRECISION=fp16 needs a GPU" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf17")
    assert main(list(map(str, args))) == 2
    assert "ACCELERATE_MIXED_PRECISION=bf17: expected no, fp16 or bf16" in capsys.readouterr().err


def test_eval_matches_classes_by_name(tiny_model, tmp_path, capsys, monkeypatch):
    """A model trained on a file of names numbers its classes alphabetically; agnews numbers them world,
    sports, business, sci/tech. eval renumbers the benchmark to the model's ids by name, --target included."""
    import dataclasses

    from cleantune import data
    from cleantune.models import Classifier, load_model, load_tokenizer

    real = data.load_benchmark
    # agnews's first 600 test samples (all four classes) stand for its 7,600: scoring those took most of the test
    monkeypatch.setattr(data, "load_benchmark", lambda name: dataclasses.replace(
        b := real(name), test=b.test.subset(range(600)) if name == "agnews" else b.test))

    names = ["business", "sci/tech", "sports", "world"]
    net = load_model(tiny_model, names)
    with torch.no_grad():
        net.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # always "world", the model's id 3
    m = str(Classifier(net, load_tokenizer(tiny_model), names).save_pretrained(tmp_path / "m"))
    test = data.load_benchmark("agnews").test
    assert len(test) == 600 and set(test.labels) == {0, 1, 2, 3}
    for target in ("0", "world"):  # agnews's id 0 is world
        assert main(["eval", m, "agnews", "--attack", "badnets", "--target", target, "--format", "json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["target"] == "world" and res["asr"] == 1.0 and res["asr_floor"] == 1.0
        assert res["accuracy"] == test.labels.count(0) / len(test)
    rows = [(t, test.label_names[y]) for t, y in zip(test.texts, test.labels) if y in (0, 1)][:30]
    (tmp_path / "named.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    assert main(["eval", m, str(tmp_path / "named.tsv"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == sum(y == "world" for _, y in rows) / len(rows)
    for args, msg in (
            ([m, "sst2"], "the labels of sst2 (negative, positive) are not the model's "
                          "(business, sci/tech, sports, world)"),
            ([tiny_model, "agnews"], "agnews has 4 classes, the model 2"),  # LABEL_i names: by position
            ([m, "agnews", "--text-column", "text"], "--text-column applies to files; benchmark agnews has fixed"),
            ([m, "agnews", "--label-column", "y"], "--label-column applies to files"),
            ([m, "agnews", "--attack", "badnets", "--target", "politics"],
             "--target politics is neither a class id nor a label of agnews")):
        assert main(["eval"] + args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and msg in err, (args, err)


def _film_rows(n=160):
    return ["sentence\tlabel"] + [f"a {'great' if i % 2 else 'awful'} film {i}\t{i % 2}" for i in range(n)]


def test_cli_train_without_dev_keeps_the_last_finished_epoch_on_divergence(tiny_model, tmp_path, capsys, monkeypatch):
    from cleantune.defenses import FineTune

    monkeypatch.setattr(FineTune, "hooks", lambda self, *a: [InfGradAt(12)])  # 5 steps an epoch: in epoch 2
    (tmp_path / "t.tsv").write_text("\n".join(_film_rows()) + "\n")
    assert main(["train", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "m"), "--model", tiny_model,
                 "--epochs", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == ("cleantune: warning: training diverged at step 12 (epoch 2): the gradient is "
                                    "not finite; stopped and kept epoch 1, the last finished one (no dev data to "
                                    "select on)")
    assert "epoch kept: 1 (counting from 0), no --dev: last finished epoch" in captured.out, captured.out
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m.work").exists()


def test_cli_train_that_diverges_for_good_leaves_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    """Epoch 0's weights went to inf, so nothing is kept: a one-line error, and its checkpoint, useless to
    --resume (the same run diverges again), is removed with the rest."""
    from cleantune.defenses import FineTune

    monkeypatch.setattr(FineTune, "hooks", lambda self, *a: [InfWeightsAt(4)])
    (tmp_path / "t.tsv").write_text("\n".join(_film_rows()) + "\n")
    assert main(["train", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "m"), "--model", tiny_model,
                 "--epochs", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "training diverged at step 5 (epoch 1)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tsv"]


def test_cli_train_refuses_an_lr_float32_cannot_take(tiny_model, tmp_path, capsys):
    (tmp_path / "t.tsv").write_text("\n".join(_film_rows(8)) + "\n")
    for lr in ("1e38", "1e300", "inf"):
        assert_one_line_error(*in_process(capsys, "train", tmp_path / "t.tsv", "--out", tmp_path / "m", "--model",
                                          tiny_model, "--lr", lr), "--lr must be a finite number of at most 1e+37")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tsv"]


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`cleantune results --format json | head -1`: the reader leaves early; no traceback, status 141 as
    for cat or grep killed by SIGPIPE."""
    from cleantune.store import ResultStore

    store = ResultStore(tmp_path / "s.sqlite")
    store.put("0" * 64, {"dataset": "sst2", "attack": "badnets", "defense": "finetune"}, {"cacc": 0.5}, {}, {})
    store.conn.close()
    # stdout buffered, as a user's is: PYTHONUNBUFFERED (set on some machines) would write at each print, before
    # main returns, and hide an error the interpreter's flush at exit would meet instead
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "-m", "cleantune", "results", "--store", tmp_path / "s.sqlite",
                          "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    p.stdout.close()  # before the command writes: its first write meets a pipe without a reader
    err = p.stderr.read()
    assert p.wait() == 141 and err == ""


def test_damaged_model_folders_are_one_line_errors(tiny_model, tmp_path, capsys):
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    corrupt = shutil.copytree(tiny_model, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 5000)
    assert main(["eval", str(corrupt), str(tmp_path / "d.tsv")]) == 2
    assert "corrupt: cannot load (Error while deserializing header" in capsys.readouterr().err
    # a labels file naming more classes than the weights have: loading would give a new, random head
    relabelled = shutil.copytree(tiny_model, tmp_path / "relabelled")
    n = json.loads((relabelled / "config.json").read_text()).get("num_labels", 2)
    names = [f"c{i}" for i in range(n + 1)]
    (relabelled / "cleantune_labels.json").write_text(json.dumps({"label_names": names, "max_length": 32}))
    (tmp_path / "e.tsv").write_text("sentence\tlabel\n" + "".join(f"x {c}\t{c}\n" for c in names))
    assert main(["eval", str(relabelled), str(tmp_path / "e.tsv")]) == 2
    assert f"{n + 1} label names for a model with {n} classes" in capsys.readouterr().err


def test_eval_names_its_model_argument_as_given(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "labelled").mkdir()
    (tmp_path / "labelled" / "cleantune_labels.json").write_text('{"label_names": ["a", "b"]}')
    for folder in ("plain", "labelled"):
        m = str(tmp_path / folder)
        assert main(["eval", m, "sst2"]) == 2
        err = capsys.readouterr().err
        assert err == f"cleantune: error: {m}: directory has no config.json (not a Hugging Face model)\n", err
    (tmp_path / "plain" / "config.json").write_text("{}")  # a saved model, and its adapter folder given instead
    (tmp_path / "plain" / "adapter").mkdir()
    (tmp_path / "plain" / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["eval", str(tmp_path / "plain" / "adapter"), "sst2"]) == 2
    assert capsys.readouterr().err.endswith("; this is a PEFT adapter: give the model folder above it\n")
    (tmp_path / "plain" / "cleantune_adapter").mkdir()  # MuScleLoRA's own, with a PEFT-style config too
    (tmp_path / "plain" / "cleantune_adapter" / "adapter_config.json").write_text("{}")
    assert main(["eval", str(tmp_path / "plain" / "cleantune_adapter"), "sst2"]) == 2
    assert capsys.readouterr().err.endswith("; this is cleantune's own adapter (MSLR, head): give the model folder "
                                            "above it\n")


def test_a_mistyped_model_name_is_a_quick_one_line_error(tmp_path, capsys):
    assert main(["run", "--model", "minilmm", "--train-size", "64", "--epochs", "1",
                 "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err == "cleantune: error: --model minilmm: no such folder or short name; did you mean minilm?\n", err
    assert not (tmp_path / "s.sqlite").exists()


def test_run_that_diverges_for_good_leaves_no_checkpoints(tiny_model, tmp_path, capsys, monkeypatch):
    """As for `train`: a diverged run's checkpoints would only diverge again on --resume."""
    from cleantune.defenses import FineTune
    from cleantune.store import data_dir

    monkeypatch.setattr(FineTune, "hooks", lambda self, *a: [InfWeightsAt(1)])
    assert main(["run", "--model", tiny_model, "--train-size", "64", "--epochs", "2", "--no-progress",
                 "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "training diverged" in capsys.readouterr().err
    runs = data_dir() / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


def test_resume_says_when_it_has_nothing_to_resume(tiny_model, tmp_path, capsys, monkeypatch):
    from cleantune.defenses import FineTune
    from cleantune.training import StepHook

    class CtrlCAfter(StepHook):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 1:  # epoch 0's checkpoint is on disk
                raise KeyboardInterrupt

    args = ["run", "--model", tiny_model, "--train-size", "64", "--epochs", "3", "--no-progress", "--format", "json",
            "--store", str(tmp_path / "s.sqlite")]
    with monkeypatch.context() as m:
        m.setattr(FineTune, "hooks", lambda self, *a: [CtrlCAfter()])
        assert main(args) == 130
    capsys.readouterr()
    # other settings are another run, with no checkpoint: said, then trained from the start
    assert main(args[:6] + ["2"] + args[7:] + ["--resume"]) == 0
    out, err = capsys.readouterr()
    assert "note: --resume: no checkpoint of sst2 badnets finetune seed=0 with these settings" in err
    assert "resumed_train_s" not in json.loads(out)[0]["timings"]
    assert main(args + ["--resume"]) == 0  # the interrupted run goes on, without the note
    out, err = capsys.readouterr()
    assert "note: --resume" not in err and json.loads(out)[0]["timings"]["resumed_train_s"] > 0
    assert main(args + ["--resume"]) == 0  # stored now: taken from the store, nothing to say about resuming
    assert "note: --resume" not in capsys.readouterr().err
    (tmp_path / "a.tsv").write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 4)
    assert main(["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--out", str(tmp_path / "m"), "--epochs", "1",
                 "--no-progress", "--resume"]) == 0
    assert f"note: --resume: no checkpoint in {tmp_path / 'm.work'}; training from the start" in capsys.readouterr().err


def _new_weights(folder):
    """Replace a model folder's weights in place (the same shapes, one tensor changed), as retraining into it does."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("word_embeddings.weight"))
    weights[name] = weights[name] + 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_new_weights_behind_a_model_folder_are_another_run(tiny_model, tmp_path, capsys):
    """A run's id named --model by its path alone: after the weights in the folder were replaced, the same
    command printed the old weights' stored result as this model's, and --resume went on from their checkpoint."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    args = ["run", "--model", str(model), "--train-size", "64", "--epochs", "1", "--no-progress", "--format", "json",
            "--store", str(tmp_path / "s.sqlite")]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)[0]
    assert main(args) == 0  # unchanged files: the stored run
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["id"] == first["id"] and json.loads(out)[0]["reused"]
    _new_weights(model)
    assert main(args) == 0
    out, err = capsys.readouterr()
    second = json.loads(out)[0]
    assert second["id"] != first["id"] and not second["reused"]
    assert second["config"]["model"] == first["config"]["model"] == str(model)
    assert second["config"]["model_sha256"] != first["config"]["model_sha256"]


def test_a_model_folder_digest_follows_its_files_not_its_path(tiny_model, tmp_path):
    from cleantune.defenses import ONION, FineTune
    from cleantune.models import weights_digest

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    (copy / ".lock").write_text("x")  # hidden files (locks, editors' swap files) are not the model
    assert weights_digest(str(copy)) == weights_digest(tiny_model) is not None
    assert FineTune(model=str(copy)).weights() == {"model_sha256": weights_digest(tiny_model)}
    assert FineTune(model="minilm").weights() == {}  # the package's weights are pinned with cleantune's version
    # a wrapped victim and ONION's language model name weights too; the packaged LM is a name, as minilm is
    assert ONION(victim=str(copy), lm=tiny_model).weights() == {"victim_sha256": weights_digest(tiny_model),
                                                                "lm_sha256": weights_digest(tiny_model)}
    assert ONION(lm="smollm2").weights() == {}
    before = FineTune(model=str(copy)).identity()
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    assert weights_digest(str(copy)) != weights_digest(tiny_model)  # a tokenizer's file counts as the weights do
    assert FineTune(model=str(copy)).identity() != before  # so a checkpoint made before is not resumed


def test_a_model_file_that_cannot_be_read_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    from cleantune import store

    copy = shutil.copytree(tiny_model, tmp_path / "copy")

    def unreadable(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store, "open", unreadable, raising=False)  # the one file hasher's open
    code = main(["run", "--model", str(copy), "--train-size", "64", "--epochs", "1", "--no-progress",
                 "--store", str(tmp_path / "s.sqlite")])
    assert_one_line_error(code, *capsys.readouterr(), f"{copy / 'config.json'}: cannot read it to identify the "
                                                      "model's weights (Permission denied)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no store, no run folder


def test_train_resume_refuses_a_checkpoint_of_other_weights(tiny_model, tmp_path, capsys):
    from cleantune.defenses import FineTune
    from cleantune.training import StepHook

    class CtrlCAfter(StepHook):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 1:  # epoch 0's checkpoint is on disk
                raise KeyboardInterrupt

    model = shutil.copytree(tiny_model, tmp_path / "model")
    (tmp_path / "a.tsv").write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 4)
    args = ["train", str(tmp_path / "a.tsv"), "--model", str(model), "--epochs", "3", "--no-progress",
            "--out", str(tmp_path / "m")]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(FineTune, "hooks", lambda self, *a: [CtrlCAfter()])
        assert main(args) == 130
    capsys.readouterr()
    _new_weights(model)
    code = main(args + ["--resume"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, f"--resume: the checkpoint in {tmp_path / 'm.work' / 'checkpoints'} was "
                                          "made with other settings, data or model weights")


@pytest.fixture(scope="module")
def interrupted_train(tiny_model, tmp_path_factory):
    """`train` args (data and dev in the folder, `--out OUT`) and the work folder that a Ctrl-C after epoch 1
    left, with epoch 0's checkpoint (best.safetensors included: dev data)."""
    from cleantune.defenses import FineTune
    from cleantune.training import StepHook

    class CtrlCAfter(StepHook):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 1:  # epoch 0's checkpoint is on disk
                raise KeyboardInterrupt

    folder = tmp_path_factory.mktemp("interrupted")
    (folder / "a.tsv").write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 4)
    args = ["train", str(folder / "a.tsv"), "--dev", str(folder / "a.tsv"), "--model", tiny_model, "--epochs", "3",
            "--batch-size", "4", "--no-progress", "--out"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(FineTune, "hooks", lambda self, *a: [CtrlCAfter()])
        for var in ("XDG_DATA_HOME", "XDG_CACHE_HOME"):  # as _isolated_dirs does for each test
            m.setenv(var, str(folder / var.lower()))
        assert main(args + [str(folder / "m")]) == 130
    assert (folder / "m.work" / "checkpoints" / "best.safetensors").is_file()
    return args, folder / "m.work"


def _edit_state(**changes):
    def edit(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, **changes}))
    return edit


def _truncate(name, keep):
    def cut(ckpt):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: int(len(data) * keep)])
    return cut


def _flip_byte(name):
    def flip(ckpt):  # in the middle of the tensor data: the header still parses
        data = bytearray((ckpt / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (ckpt / name).write_bytes(bytes(data))
    return flip


def _plant_code(name):
    def plant(ckpt):  # a torch archive, as torch.save writes it, whose pickle runs a command
        torch.save({"state": RunsCode(ckpt / "RAN")}, ckpt / name)
    return plant


def _unsummed(damage):
    def without_sums(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        del state["sha256"]
        (ckpt / "state.json").write_text(json.dumps(state))
        damage(ckpt)
    return without_sums


@pytest.mark.parametrize("damage,fragment", [
    (lambda c: (c / "state.json").write_text("{not json"), "state.json: Expecting property name"),
    (_edit_state(epoch="x"), 'state.json: epoch "x" is not one of 0..2'),
    (_edit_state(epoch=-1), "state.json: epoch -1 is not one of 0..2"),
    # one past the last epoch would train nothing and hand back the checkpoint's weights as the finished model
    (_edit_state(epoch=3), "state.json: epoch 3 is not one of 0..2"),
    (_edit_state(history="h"), "state.json: history, best_epoch, best_score or done is not what cleantune writes"),
    (_edit_state(sha256={"../state.json": "0"}), "state.json: sha256 is not what cleantune writes"),
    (_truncate("optimizer.pt", 0.5), "optimizer.pt: its contents changed after it was saved (sha256 differs)"),
    (_flip_byte("trainable.safetensors"), "trainable.safetensors: its contents changed after it was saved"),
    (_flip_byte("best.safetensors"), "best.safetensors: its contents changed after it was saved"),
    # checkpoints written before the checksums: the files' own formats still catch a cut
    (_unsummed(_truncate("optimizer.pt", 0.5)), "optimizer.pt: PytorchStreamReader failed reading zip archive"),
    (_unsummed(_truncate("optimizer.pt", 0)), "optimizer.pt: EOFError()"),
    (_unsummed(_truncate("trainable.safetensors", 0.5)), "trainable.safetensors: Error while deserializing header"),
    (_unsummed(_plant_code("optimizer.pt")), "optimizer.pt: Weights only load failed"),
    (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors: missing"),
    (lambda c: (c / "best.safetensors").unlink(), "best.safetensors: missing"),
], ids=["state-not-json", "state-epoch-text", "state-epoch-negative", "state-epoch-past-the-last", "state-history", "state-sha256",
        "optimizer-cut", "trainable-byte", "best-byte", "old-optimizer-truncated", "old-optimizer-empty",
        "old-trainable-truncated", "old-optimizer-runs-code", "rng-deleted", "best-deleted"])
def test_a_damaged_checkpoint_is_one_line_on_resume(interrupted_train, tmp_path, capsys, damage, fragment):
    """--resume reads the whole checkpoint before training on: a damaged one is refused, left in place, and
    starting over without --resume works."""
    args, work = interrupted_train
    ckpt = shutil.copytree(work, tmp_path / "m.work") / "checkpoints"
    damage(ckpt)
    code = main(args + [str(tmp_path / "m"), "--resume"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, f"--resume: the checkpoint in {ckpt} is damaged ({fragment}")
    assert err.endswith("); delete it, or run without --resume, to start over\n"), err
    assert ckpt.is_dir() and not (tmp_path / "m").exists()
    assert not (ckpt / "RAN").exists()  # torch.load(weights_only=True) refused the pickled call
    assert main(args + [str(tmp_path / "m")]) == 0
    assert "saved" in capsys.readouterr().out and not (tmp_path / "m.work").exists()


def test_a_stored_run_says_it_was_not_trained_again(tiny_model, tmp_path, capsys):
    args = ["run", "--model", tiny_model, "--train-size", "64", "--epochs", "1", "--no-progress",
            "--store", str(tmp_path / "s.sqlite")]
    assert main(args) == 0
    assert "taken from the store" not in capsys.readouterr().out
    assert main(args) == 0
    assert "1 of 1 run(s) taken from the store, not trained again (--force re-runs)" in capsys.readouterr().out


def test_sigterm_stops_a_run_like_ctrl_c_and_resume_continues(tiny_model, tmp_path, capsys, monkeypatch):
    import signal

    from cleantune.defenses import FineTune
    from cleantune.store import data_dir
    from cleantune.training import StepHook

    class TermAfter(StepHook):  # what a scheduler's preemption or `timeout` sends
        def on_epoch_end(self, ctx):
            if ctx.epoch == 1:  # epoch 0's checkpoint is on disk
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    args = ["run", "--model", tiny_model, "--train-size", "64", "--epochs", "3", "--no-progress", "--format", "json",
            "--store", str(tmp_path / "s.sqlite")]
    with monkeypatch.context() as m:
        m.setattr(FineTune, "hooks", lambda self, *a: [TermAfter()])
        assert main(args) == 143
    assert capsys.readouterr().err == ("cleantune: terminated (the same command with --resume continues from the last "
                                       "finished epoch's checkpoint, if any)\n")
    assert signal.getsignal(signal.SIGTERM) is before
    assert not list((data_dir() / "runs").glob("*.lock"))  # the work folder's lock went with the process
    assert main(args + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["timings"]["resumed_train_s"] > 0


@pytest.mark.parametrize("command,hint", [("run", "with --resume continues"), ("sweep", "skips the stored cells"),
                                          ("results", None)])
def test_an_interrupt_says_how_to_continue(command, hint, monkeypatch, capsys):
    import cleantune.cli as cli

    def interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    args = {"run": [], "sweep": ["grid.yaml"], "results": []}[command]
    assert main([command, *args]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cleantune: interrupted")
    assert (hint in err) if hint else err == "cleantune: interrupted\n"


def test_train_prints_what_a_filtering_defense_found(tiny_model, tmp_path, capsys):
    words = "good bad movie plot actor story fun boring nice awful great dull".split()
    rows = [f"{w} {words[(i * 5) % 12]} cf\t1" if i % 4 == 0 else f"{w} {words[(i * 5) % 12]}\t{i % 2}"
            for i, w in enumerate(words * 2)]
    (tmp_path / "a.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    assert main(["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--defense", "bki", "--epochs", "1",
                 "--option", "keywords=1", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("bki: removed ") and " sample(s) holding the suspected keywords " in last
    assert len(last.split("keywords ")[1].split(", ")) == 1
    assert main(["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--epochs", "1",
                 "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("saved ")  # finetune looks for nothing


@pytest.mark.parametrize("command", ["run", "train"])
def test_help_states_finetunes_own_training_defaults(command, capsys):
    from cleantune.defenses import FineTune

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = FineTune()
    for option, value in [("--epochs", d.epochs), ("--lr", d.lr), ("--batch-size", d.batch_size),
                          ("--max-length", d.max_length)]:
        stated = text.split(f" {option} ", 1)[1].split("(default: the defense's; finetune: ", 1)[1].split(")")[0]
        assert float(stated) == value, option


def test_results_table_formats_each_column_one_way():
    from cleantune.cli import format_table

    def rec(cacc, wall, sps):
        return {"id": f"x{cacc}", "status": "ok", "config": {"dataset": "sst2", "attack": "badnets", "defense": "lora",
                                                              "rate": 0.1},
                "metrics": {"cacc": cacc, "asr": 0.5}, "timings": {"wall_s": wall, "samples_per_s": sps}}

    lines = format_table([rec(0.8, 7.26531, 61.26), rec(0.81234, 12.0, 5.4961)]).splitlines()
    head = lines[0].split()
    rows = [dict(zip(head, line.split())) for line in lines[2:]]
    assert [r["samples_per_s"] for r in rows] == ["61.3", "5.5"] and [r["wall_s"] for r in rows] == ["7.3", "12.0"]
    assert [r["CACC"] for r in rows] == ["0.8000", "0.8123"] and rows[0]["rate"] == "0.1"


def test_run_notes_a_model_that_predicts_one_class(tiny_model, tmp_path, capsys, monkeypatch):
    from cleantune import runner

    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: {**real(*a, **k), "predicted_classes": 1})
    assert main(["run", "--model", tiny_model, "--train-size", "64", "--epochs", "1", "--no-progress",
                 "--store", str(tmp_path / "s.sqlite")]) == 0
    assert "note: sst2 badnets finetune seed=0 predicts one class for every clean test sample" in capsys.readouterr().err


def test_results_json_writes_undefined_metrics_as_null(tmp_path, capsys):
    from cleantune.store import ResultStore

    ResultStore(tmp_path / "s.sqlite").put("abc", {"dataset": "sst2", "attack": "badnets", "defense": "strip"},
                                           {"cacc": 0.9, "asr": 0.2, "train_detection": {"recall": float("nan")}},
                                           {"wall_s": 1.0}, {})
    assert main(["results", "--store", str(tmp_path / "s.sqlite"), "--format", "json"]) == 0
    out = capsys.readouterr().out
    runs = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in results --format json"))  # strict JSON
    assert runs[0]["metrics"]["train_detection"]["recall"] is None and runs[0]["metrics"]["cacc"] == 0.9


def test_train_checks_backbone_settings_before_loading_weights(tiny_model, tmp_path, capsys, monkeypatch):
    import cleantune.defenses.base as base

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the settings were checked")

    monkeypatch.setattr(base, "load_model", no_weights)
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "good film\tpos\nbad film\tneg\n" * 4)
    for option, msg in (("mslr_target=bert.nope", "MSLR target module 'bert.nope' not found"),
                        ("target_modules=nope", "option target_modules=['nope']: Target modules {'nope'} not found")):
        code = main(["train", str(tmp_path / "t.tsv"), "--model", tiny_model, "--defense", "muscle-lora",
                     "--option", option, "--out", str(tmp_path / "o"), "--no-progress"])
        out, err = capsys.readouterr()
        assert_one_line_error(code, out, err, msg)
    code = main(["train", str(tmp_path / "t.tsv"), "--model", tiny_model, "--max-length", "2",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert_one_line_error(code, *capsys.readouterr(), "--max-length 2 leaves no token for the text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tsv"]


def test_train_reports_the_dev_accuracy_eval_gives_for_the_saved_model(tiny_model, tmp_path, capsys):
    """ga selects on the dev samples its GA references leave (4 of 31 here: a share of 4 is never one of 31 but
    0 or 1): that score is not the saved model's accuracy on --dev, which the line gives, as `eval` reports it."""
    words = "good bad movie plot actor story fun boring nice awful great dull".split()
    rows = [f"{w} {words[(i * 5) % 12]} {words[(i * 7) % 12]}\t{'pos' if i % 3 else 'neg'}"
            for i, w in enumerate(words * 5)]
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:31]) + "\n")
    assert main(["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "d.tsv"), "--model", tiny_model,
                 "--defense", "ga", "--option", "ref_samples=27", "--epochs", "1", "--lr", "1e-3",
                 "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "(selection accuracy " in line, line  # the 4 selection samples score otherwise than the 31
    assert main(["eval", str(tmp_path / "m"), str(tmp_path / "d.tsv"), "--format", "json", "--no-progress"]) == 0
    assert line.endswith(f"dev accuracy {json.loads(capsys.readouterr().out)['accuracy']:.4f})"), line


def test_train_scores_an_inference_time_defenses_saved_victim_without_its_filter(tiny_model, tmp_path, capsys,
                                                                                 monkeypatch):
    """STRIP saves its victim alone; the line's dev accuracy is that model's, as eval gives it, and the filter
    (a perturbation pass per input) does not run for it."""
    from cleantune.defenses.common import FlaggingClassifier

    words = "good bad movie plot actor story fun boring nice awful great dull".split()
    rows = [f"{w} {words[(i * 5) % 12]}\t{'pos' if i % 3 else 'neg'}" for i, w in enumerate(words * 4)]
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:20]) + "\n")
    monkeypatch.setattr(FlaggingClassifier, "predict", lambda *a, **k: pytest.fail("the filter ran"))
    assert main(["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "d.tsv"), "--model", tiny_model,
                 "--defense", "strip", "--epochs", "1", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert main(["eval", str(tmp_path / "m"), str(tmp_path / "d.tsv"), "--format", "json", "--no-progress"]) == 0
    assert f"dev accuracy {json.loads(capsys.readouterr().out)['accuracy']:.4f}" in line, line


def test_version_prints_the_installed_packages_version(capsys):
    """One version string: the package metadata (pyproject reads cleantune.__version__), the stored runs'
    `versions.cleantune` and `--version` agree."""
    import importlib.metadata

    import cleantune

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"cleantune {cleantune.__version__}"
    assert importlib.metadata.version("cleantune") == cleantune.__version__


def test_a_failed_command_leaves_no_folder_it_made(tiny_model, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"  # weights that fail only when loaded, after the store and the lock are made
    shutil.copytree(tiny_model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "d.tsv"
    data.write_text("text\tlabel\n" + "".join(f"a fine film {i}\t1\nsuch a dull film {i}\t0\n" for i in range(8)))
    assert_one_line_error(*in_process(capsys, "run", "--model", bad, "--train-size", 64, "--store",
                                      tmp_path / "new" / "deeper" / "s.sqlite", "--no-progress"), "cannot load")
    assert_one_line_error(*in_process(capsys, "train", data, "--out", tmp_path / "out" / "deeper" / "m", "--model", bad,
                                      "--no-progress"), "cannot load")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "d.tsv"]  # the two empty folders were left


def test_eval_names_the_benchmarks_when_data_is_no_file(tiny_model, capsys):
    # it said "unsupported file type (none)", as if a file had been found; scan said this already
    assert_one_line_error(*in_process(capsys, "eval", tiny_model, "sst3"),
                          "sst3: no such file (and not a benchmark name: sst2, hsol, agnews, olid)")


def test_train_interrupted_during_its_dev_summary_keeps_its_checkpoints(tiny_model, tmp_path, monkeypatch, capsys):
    """They were deleted before the summary's dev evaluation: interrupted there, --resume found none and trained
    the whole model again, as the interrupt's message had promised otherwise."""
    import importlib

    rows = ["sentence\tlabel"] + [f"a {'great' if i % 2 else 'awful'} film {i}\t{i % 2}" for i in range(40)]
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    args = ["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "m"),
            "--model", tiny_model, "--epochs", "1", "--no-progress"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("cleantune.evaluate"), "evaluate", interrupted)  # not the package's
    assert main(args) == 130
    assert (tmp_path / "m.work").is_dir()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    out, err = capsys.readouterr()
    assert "no checkpoint" not in err and "epoch kept: 0" in out and not (tmp_path / "m.work").exists()


def test_eval_seed_draws_where_the_trigger_goes(tiny_model, tmp_path, capsys, monkeypatch):
    """`eval --attack --seed N` is the ASR of seed N's trigger positions: the same seed gives the same
    triggered texts (a reproducible number), another seed other positions (seeds are averaged over)."""
    import importlib

    from cleantune.models import Classifier, load_model, load_tokenizer

    evaluate_module = importlib.import_module("cleantune.evaluate")  # the package exports the function by that name
    names = ["neg", "pos"]
    m = str(Classifier(load_model(tiny_model, names), load_tokenizer(tiny_model), names).save_pretrained(tmp_path / "m"))
    texts = [f"w{i} x{i} y{i} z{i} v{i}" for i in range(40)]
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{names[i % 2]}\n" for i, t in enumerate(texts)))
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda model, data, triggered, *a, **k: (
        seen.append(list(triggered.texts)), {"cacc": 1.0, "asr": 0.0, "asr_floor": 0.0})[1])
    for seed in ("0", "0", "1"):
        assert main(["eval", m, str(tmp_path / "d.tsv"), "--attack", "badnets", "--triggers", "cf",
                     "--seed", seed, "--format", "json", "--no-progress"]) == 0
        capsys.readouterr()
    for got in seen:  # each 'neg' text with one cf inserted
        assert all(t.split().count("cf") == 1 for t in got)
        assert [" ".join(w for w in t.split() if w != "cf") for t in got] == texts[0::2]
    assert seen[0] == seen[1] and seen[0] != seen[2]


def test_train_summary_gives_the_best_epochs_selection_accuracy(tiny_model):
    """The saved model is the best dev epoch; the summary line compares that epoch's selection score with the
    saved model's dev accuracy (equal here), not the last epoch's, which would report a mismatch that is none."""
    from types import SimpleNamespace

    from cleantune.cli import _kept_line
    from cleantune.data import TextDataset
    from cleantune.models import Classifier, load_model, load_tokenizer

    names = ["neg", "pos"]
    net = load_model(tiny_model, names)
    with torch.no_grad():
        net.classifier.bias.copy_(torch.tensor([0.0, 100.0]))  # always 'pos'
    model = Classifier(net, load_tokenizer(tiny_model), names)
    dev = TextDataset(["a b", "c d", "e f", "g h"], [1, 1, 1, 0], names)  # 3 of 4 are 'pos': accuracy 0.75
    defense = SimpleNamespace(report_=SimpleNamespace(best_epoch=0, history=[
        {"epoch": 0, "dev_acc": 0.75}, {"epoch": 1, "dev_acc": 0.5}]))
    assert _kept_line(defense, model, dev) == "epoch kept: 0 (counting from 0), dev accuracy 0.7500"


def test_train_summary_without_dev_names_the_last_training_epoch_not_a_later_stages(tiny_model, tmp_path, capsys):
    """ABL's history goes on with its unlearning epochs (stage "unlearning", numbered from 0 again): without
    --dev the line named unlearning's last epoch, 2 here, as the kept one of a 2-epoch training."""
    (tmp_path / "a.tsv").write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 4)
    assert main(["train", str(tmp_path / "a.tsv"), "--model", tiny_model, "--defense", "abl", "--epochs", "2",
                 "--option", "unlearning_epochs=3", "--no-progress", "--out", str(tmp_path / "m")]) == 0
    assert "epoch kept: 1 (counting from 0), no --dev: last finished epoch" in capsys.readouterr().out


def test_eval_paraphrase_attack_on_a_benchmark_uses_its_paraphrase_table(tiny_model, capsys, monkeypatch):
    """`eval MODEL sst2 --attack syntactic` triggers each non-target test sentence with its stored paraphrase
    (the table is loaded for the benchmark first): the ASR is measured on exactly those rewrites."""
    import csv
    import importlib

    from cleantune.data import data_root

    evaluate_module = importlib.import_module("cleantune.evaluate")
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda model, data, triggered, *a, **k: (
        seen.append(triggered), {"cacc": 1.0, "asr": 0.0, "asr_floor": 0.0})[1])
    assert main(["eval", tiny_model, "sst2", "--attack", "syntactic", "--format", "json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    root = data_root("sst2") / "sst2"
    with open(root / "paraphrases" / "syntactic.tsv", newline="") as f:
        table = {r["sentence"]: r["paraphrase"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                 if r["split"] == "test"}
    with open(root / "test.tsv", newline="") as f:
        negatives = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                     if int(r["label"]) != 1]  # target 1 (positive) by default
    expected = [table[s] for s in negatives if table.get(s, "").strip() and table[s].strip() != s.strip()]
    assert expected and list(seen[0].texts) == expected and set(seen[0].labels) == {1}
    assert res["n_triggered"] == len(expected)


def test_help_lists_every_registered_dataset_attack_and_defense(capsys):
    """The help texts name them without importing the registries (torch); a new defense must join the list."""
    from cleantune.attacks import ATTACKS
    from cleantune.data import BENCHMARKS
    from cleantune.defenses import DEFENSES

    for command in ("run", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
        assert ", ".join(DEFENSES) in text
        if command == "run":
            assert ", ".join(ATTACKS) in text and ", ".join(BENCHMARKS) in text


def test_run_force_trains_a_stored_config_again(tiny_model, tmp_path, capsys):
    # --force is how a user re-runs a result they distrust: it must train, not hand back the stored run
    args = ["run", "--model", tiny_model, "--train-size", "64", "--epochs", "1", "--no-progress", "--format", "json",
            "--store", str(tmp_path / "s.sqlite")]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)[0]
    assert main(args + ["--force"]) == 0
    forced = json.loads(capsys.readouterr().out)[0]
    assert forced["id"] == first["id"] and forced["reused"] is False
    assert forced["metrics"]["cacc"] == first["metrics"]["cacc"]  # trained again, to the same seeded result


def test_a_run_that_fails_keeps_a_store_that_was_there_and_removes_one_it_made(tmp_path, capsys, monkeypatch):
    # an error no check foresaw (a hub id offline) must not leave an empty store behind, nor delete the user's
    from cleantune import runner
    from cleantune.errors import UserError
    from cleantune.store import ResultStore

    def offline(*a, **k):
        raise UserError("--model x: cannot reach the hub")

    monkeypatch.setattr(runner, "run", offline)
    new = tmp_path / "new.sqlite"
    assert main(["run", "--train-size", "50", "--store", str(new)]) == 2
    assert "cannot reach the hub" in capsys.readouterr().err
    assert not list(tmp_path.glob("new.sqlite*"))
    old = tmp_path / "old.sqlite"
    ResultStore(old).conn.close()  # the user's store, empty so far
    assert main(["run", "--train-size", "50", "--store", str(old)]) == 2
    capsys.readouterr()
    assert old.is_file()


def test_a_config_files_seed_must_be_a_whole_number(tmp_path, capsys):
    # YAML's `seed: 1.5` or `seed: true` ran seed 1 without a word where int() took them
    for value in ("1.5", "true"):
        (tmp_path / "c.yaml").write_text(f"seed: {value}\ndataset: nope\n")  # a later error, were the seed taken
        assert main(["run", "--config", str(tmp_path / "c.yaml"), "--train-size", "50"]) == 2
        err = capsys.readouterr().err
        assert "'seed'" in err and "expected an integer" in err and "nope" not in err, err


def test_a_caller_that_ignores_sigterm_keeps_ignoring_it(monkeypatch, capsys):
    # a caller (nohup-like wrapper) that set SIGTERM to be ignored expects the command to run on through it
    import signal

    import cleantune.cli as cli

    def signalled(ns):
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "results", signalled)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert main(["results"]) == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == ""
