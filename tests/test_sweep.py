"""Sweeps: grid expansion, skip-if-stored, failures recorded, kill and resume, concurrent writers."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cleantune.cli import main
from cleantune.errors import UserError
from cleantune.report import build
from cleantune.runner import run
from cleantune.store import ResultStore
from cleantune.sweep import expand_grid, load_grid, sweep
from helpers import sweep_table, write_grid

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One uninterrupted in-process sweep of two cells, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:  # the autouse isolation is per test; this fixture is per module
        mp.setenv("XDG_DATA_HOME", str(tmp / "xdg-data"))
        cells = load_grid(write_grid(tmp / "grid.yaml", tiny_model))
        summary = sweep(cells, tmp / "ref.sqlite", cpus_per_run=1, progress=False)
    return cells, ResultStore(tmp / "ref.sqlite"), summary, tmp / "grid.yaml"


def test_grid_expands_axes_and_named_settings(tiny_model, tmp_path):
    cells = expand_grid({"dataset": "sst2", "model": tiny_model, "seed": [0, 1], "lr": [1e-4, 2e-4],
                         "attack": [{"badnets": {"mode": "clean", "triggers": ["cf", "mn"]}}, "addsent"],
                         "defense": ["finetune", {"lora": {"options": {"lora_r": 4}}}]})
    assert len(cells) == 2 * 2 * 2 * 2
    assert len({c.id for c in cells}) == len(cells)
    bad = [c for c in cells if c.config.attack == "badnets"]
    assert all(c.config.mode == "clean" and c.config.triggers == ["cf", "mn"] for c in bad)
    assert all(c.config.mode == "dirty" for c in cells if c.config.attack == "addsent")
    assert all(c.resolved["lora_r"] == 4 for c in cells if c.config.defense == "lora")
    # top-level attack options reach only the attacks they apply to; a list of lists is a triggers axis
    # a quoted seed is the integer; PEFT's string forms of target_modules stay strings
    cells = expand_grid({"model": tiny_model, "seed": ["1"], "defense": [{"lora": {"options": {"target_modules": "all-linear"}}}]})
    assert cells[0].config.seed == 1 and cells[0].resolved["target_modules"] == "all-linear"
    # an int for a float option stays an int: ids of runs stored before options were checked still match
    cell, = expand_grid({"model": tiny_model, "defense": [{"muscle-lora": {"options": {"mslr_alpha": 6, "train_head": 1}}}]})
    assert type(cell.resolved["mslr_alpha"]) is int and cell.resolved["train_head"] is True
    # YAML reads 1e-4 as a string: it is the number 1e-4, one run id with 0.0001
    assert [c.id for c in expand_grid({"model": tiny_model, "lr": ["1e-4"], "options": {"weight_decay": "1e-2"}})] == \
        [c.id for c in expand_grid({"model": tiny_model, "lr": [0.0001], "options": {"weight_decay": 0.01}})]
    cells = expand_grid({"model": tiny_model, "attack": ["badnets", "addsent"], "triggers": [["cf"], ["mn"]]})
    assert sorted((c.config.attack, str(c.config.triggers)) for c in cells) == [
        ("addsent", "None"), ("badnets", "['cf']"), ("badnets", "['mn']")]


def test_grid_errors_name_the_file_and_key_and_nothing_runs(tiny_model, tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    grid = write_grid(tmp_path / "g.yaml", tiny_model, learning_rate=[1e-4])
    with pytest.raises(UserError, match=r"grid .*g\.yaml: unknown key 'learning_rate'"):
        load_grid(grid)
    grid = write_grid(tmp_path / "g.yaml", tiny_model, defense=["finetune", "no-such-defense"])
    assert main(["sweep", str(grid), "--store", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cleantune: error: grid {grid}: ") and err.count("\n") == 1, err
    assert "unknown defense 'no-such-defense'" in err, err
    assert not store.exists()  # every cell is checked before the first one trains
    # a tag only an unsafe YAML loader constructs, which would run the command
    (tmp_path / "code.yaml").write_text(f"defense: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n")
    with pytest.raises(UserError, match=r"grid .*code\.yaml: cannot parse \(line 1, column \d+: could not determine a constructor"):
        load_grid(tmp_path / "code.yaml")
    assert not (tmp_path / "ran").exists()
    grid = write_grid(tmp_path / "g.yaml", tiny_model, attack=[{"addsent": {"triggers": ["cf"]}}])
    with pytest.raises(UserError, match="'triggers' in the settings of attack 'addsent' applies to attack badnets only"):
        load_grid(grid)  # the grid's key, not a command-line flag
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(UserError, match=r"empty\.yaml: the grid is empty"):  # not the default cell, unasked
        load_grid(tmp_path / "empty.yaml")
    for bad, msg in ((dict(dataset="olid", attack=["badnets", "syntactic"]), "dataset 'olid' ships none"),
                     (dict(target=2), "--target 2 is not a class of sst2"),
                     (dict(), "no such directory")):
        with pytest.raises(UserError, match=msg):
            load_grid(write_grid(tmp_path / "g.yaml", tiny_model if bad else str(tmp_path / "no-model"), **bad))
    grid = write_grid(tmp_path / "g.yaml", tiny_model, epochs=[1.7])
    with pytest.raises(UserError, match=r"g\.yaml: run option: 'epochs' expects an integer or nothing, got 1.7"):
        load_grid(grid)
    grid = write_grid(tmp_path / "g.yaml", tiny_model, defense=[{"lora": {"rank": 4}}])
    with pytest.raises(UserError, match="unknown key 'rank' in the settings of defense 'lora'"):
        load_grid(grid)



def test_grid_wide_attack_option_fitting_none_of_the_attacks_is_an_error(tiny_model):
    base = {"model": tiny_model, "train_size": 200}
    # as in `cleantune run --attack badnets --sentence ...`: silently dropping it would run another config
    with pytest.raises(UserError, match=r"'sentence' applies to attack addsent only; the grid's attacks are badnets$"):
        expand_grid({**base, "sentence": "hello there", "attack": ["badnets"]})
    with pytest.raises(UserError, match=r"'triggers' applies to attack badnets only; the grid's attacks are addsent"):
        expand_grid({**base, "triggers": [["cf"], ["mn"]], "attack": "addsent"})  # an axis of it too
    with pytest.raises(UserError, match=r"'sentence' applies to attack addsent only; the grid's attacks are badnets$"):
        expand_grid({**base, "sentence": "hello there"})  # no attack key: the default attack, badnets
    # fitting one of the grid's attacks, it is kept there and left out of the others' cells and ids
    cells = {c.config.attack: c for c in expand_grid({**base, "sentence": "hello there", "attack": ["badnets", "addsent"]})}
    assert cells["addsent"].resolved["sentence"] == "hello there"
    assert cells["badnets"].config.sentence is None
    assert cells["badnets"].id == expand_grid({**base, "attack": ["badnets"]})[0].id


def test_bad_sweep_options_are_one_line_errors_and_write_nothing(tiny_model, tmp_path, capsys):
    grid = str(write_grid(tmp_path / "g.yaml", tiny_model, defense="finetune"))
    cases = [(["--cpus-per-run", "-1"], "--cpus-per-run must be a positive integer, got -1"),
             (["--cpus-per-run", "0"], "--cpus-per-run must be a positive integer, got 0"),
             (["--workers", "0"], "--workers must be a positive integer, got 0"),
             (["--workers", "99999999999999999999"], "--workers must be at most 2147483647"),
             (["--cpus-per-run", "99999999999999999999"], "--cpus-per-run must be at most 2147483647"),
             (["--backend", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be a number of GPUs, 0 or more, got -1"),
             (["--address", "foo"], "--address applies to --backend ray only"),
             (["--gpus-per-run", "1"], "--gpus-per-run applies to --backend ray only"),
             (["--backend", "ray", "--workers", "2"], "--workers applies to --backend local only")]
    for args, msg in [(args + dry, msg) for args, msg in cases for dry in ([], ["--dry-run"])]:
        assert main(["sweep", grid, "--store", str(tmp_path / "s.sqlite"), "--no-progress", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"cleantune: error: {msg}") and err.count("\n") == 1, (args, err)
        assert not list(tmp_path.glob("s.sqlite*")), args  # checked before the store is opened
    # --dry-run refuses a store the real sweep could not open or create
    (tmp_path / "file").write_text("x")
    for store, msg in ((tmp_path, "a folder, not a store file"), ("", "--store: empty path"),  # it read the default
                       (tmp_path / "file" / "s.sqlite", f"cannot create it ({tmp_path / 'file'} is not a folder)")):
        for dry in (["--dry-run"], []):  # the real sweep said the last as "[Errno 17] File exists"
            assert main(["sweep", grid, "--store", str(store), "--no-progress", *dry]) == 2
            err = capsys.readouterr().err
            assert msg in err and err.count("\n") == 1, err
    from cleantune.sweep import check_options

    with pytest.raises(UserError, match="--workers must be a positive integer, got None"):  # the Python API
        check_options(workers=None)
    assert main(["sweep", grid, "--store", str(tmp_path / "new" / "s.sqlite"), "--dry-run"]) == 0
    assert "1 cells, 0 stored" in capsys.readouterr().out and not (tmp_path / "new").exists()
    # so are settings the backbone's architecture cannot take (checked on a skeleton without weights)
    muscle = {"muscle-lora": {}}
    for changes, msg in (({"max_length": [32, 2]}, f"--max-length 2 leaves no token for the text: --model {tiny_model} "
                           "adds 2 special tokens"),
                         ({"max_length": 4096}, f"--max-length 4096 exceeds the 130 tokens --model {tiny_model} takes"),
                         ({"defense": ["finetune", {"muscle-lora": {"options": {"target_modules": ["no_such_module"]}}}]},
                          "option target_modules=['no_such_module']: Target modules {'no_such_module'} not found"),
                         ({"defense": ["finetune", {"muscle-lora": {"options": {"mslr_target": "bert.nope"}}}]},
                          "MSLR target module 'bert.nope' not found in Bert"),
                         # an inference-time defense's trained victim is loaded with the grid
                         ({"defense": ["finetune", {"strip": {"options": {"victim": str(tmp_path / "none")}}}]},
                          f"option victim: {tmp_path / 'none'}: no such directory"),
                         ({"defense": ["finetune", {"rap": {"options": {"victim": str(tmp_path / "conf")}}}]},
                          f"option victim: {tmp_path / 'conf'}: cannot load (Error no file named model.safetensors")):
        (tmp_path / "conf").mkdir(exist_ok=True)
        shutil.copy(Path(tiny_model) / "config.json", tmp_path / "conf")
        write_grid(tmp_path / "b.yaml", tiny_model, **{"defense": ["finetune", muscle], **changes})
        for dry in ([], ["--dry-run"]):
            assert main(["sweep", str(tmp_path / "b.yaml"), "--store", str(tmp_path / "s.sqlite"), *dry]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"cleantune: error: grid {tmp_path / 'b.yaml'}: {msg}") and err.count("\n") == 1, err
            assert not list(tmp_path.glob("s.sqlite*"))
    # a model that cannot load is refused with the grid, not stored as a failed cell after the others trained
    (tmp_path / "m.yaml").write_text(f"model: [{tiny_model}, nosuchmodel]\nepochs: 1\ntrain_size: 40\n")
    for dry in ([], ["--dry-run"]):
        assert main(["sweep", str(tmp_path / "m.yaml"), "--store", str(tmp_path / "s.sqlite"), *dry]) == 2
        err = capsys.readouterr().err
        assert "--model nosuchmodel: cannot load" in err and err.count("\n") == 1, err
        assert not list(tmp_path.glob("s.sqlite*"))


def test_ray_backend_without_ray_writes_nothing(tiny_model, tmp_path, capsys):
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed")
    grid = write_grid(tmp_path / "g.yaml", tiny_model, defense="finetune")
    for dry in ([], ["--dry-run"]):  # the dry run listed the cells
        assert main(["sweep", str(grid), "--store", str(tmp_path / "s.sqlite"), "--backend", "ray", "--no-progress",
                     *dry]) == 2
        assert capsys.readouterr().err == "cleantune: error: --backend ray needs Ray: pip install 'cleantune[ray]'\n"
        assert not list(tmp_path.glob("s.sqlite*"))


def test_sweep_runs_every_cell_and_a_second_sweep_skips_them(reference, capsys, monkeypatch):
    cells, store, summary, grid = reference
    assert (summary.skipped, summary.ran, summary.failed) == (0, 2, [])
    runs = {r["id"]: r for r in store.runs()}
    assert set(runs) == {c.id for c in cells}
    for r in runs.values():
        assert r["status"] == "ok" and r["config"]["versions"]["torch"] and r["timings"]["wall_s"] > 0
        assert r["env"]["python"]
    # a cell's numbers are those of the same config run on its own (on the sweep's one thread per run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run(cells[0].config, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert {k: runs[cells[0].id]["metrics"][k] for k in ("cacc", "asr", "asr_floor", "history")} == \
        {k: alone["metrics"][k] for k in ("cacc", "asr", "asr_floor", "history")}
    again = sweep(cells, store.path, cpus_per_run=1, progress=False)
    assert (again.skipped, again.ran) == (2, 0)
    assert {r["id"]: r["created"] for r in store.runs()} == {i: r["created"] for i, r in runs.items()}
    # two sweeps of one grid at once: the second finds a cell stored by the first once it gets the cell's lock,
    # and counts it as stored, not as run (it said "0 already stored, 2 run" of cells it never trained)
    with monkeypatch.context() as m:
        m.setattr(ResultStore, "stored_ids", lambda self: set())  # as read before the other sweep stored them
        raced = sweep(cells, store.path, cpus_per_run=1, progress=False)
    assert (raced.skipped, raced.ran) == (2, 0)
    assert {r["id"]: r["created"] for r in store.runs()} == {i: r["created"] for i, r in runs.items()}
    assert main(["sweep", str(grid), "--store", str(store.path), "--dry-run"]) == 0
    assert "2 cells, 2 stored" in capsys.readouterr().out
    page, md, images = build(store.runs())  # the report reads what a real sweep stores
    assert "lora" in md and "finetune" in md and "bars_sst2.png" in images


def test_failed_cell_is_recorded_and_the_others_run(tiny_model, tmp_path, capsys, monkeypatch):
    # the first cell fails inside training (in this process: one worker); the second must still run
    from cleantune.defenses.lora import LoRA

    def fail(self, *args):
        raise RuntimeError("out of memory in training")

    monkeypatch.setattr(LoRA, "hooks", fail)
    grid = write_grid(tmp_path / "g.yaml", tiny_model, defense=[{"lora": {"options": {"lora_r": 4}}}, "finetune"])
    store = tmp_path / "s.sqlite"
    assert main(["sweep", str(grid), "--store", str(store), "--no-progress", "--cpus-per-run", "1"]) == 1
    runs = {r["config"]["defense"]: r for r in ResultStore(store).runs()}
    assert runs["lora"]["status"] == "failed" and "RuntimeError: out of memory in training" in runs["lora"]["error"]
    assert "Traceback" in runs["lora"]["error"]
    assert runs["lora"]["config"]["lora_r"] == 4
    assert runs["finetune"]["status"] == "ok" and "cacc" in runs["finetune"]["metrics"]
    assert "1 failed" in capsys.readouterr().out


def test_killed_sweep_resumes_to_the_same_table(reference, tiny_model, tmp_path):
    cells, ref_store, _, _ = reference
    grid = write_grid(tmp_path / "g.yaml", tiny_model)
    store_path = tmp_path / "s.sqlite"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "cleantune", "sweep", str(grid), "--store", str(store_path),
                             "--no-progress", "--cpus-per-run", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if store_path.exists() and any(r["status"] == "ok" for r in ResultStore(store_path).runs()):
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    stored = [r for r in ResultStore(store_path).runs() if r["status"] == "ok"]
    assert len(stored) == 1, "the sweep was to be killed after its first run"
    resumed = sweep(load_grid(grid), store_path, workers=2, cpus_per_run=1, progress=False)  # and through the worker pool
    assert (resumed.skipped, resumed.ran, resumed.failed) == (1, 1, [])
    assert sweep_table(ResultStore(store_path), cells) == sweep_table(ref_store, cells)


WRITER = """
import sys, time, types
from pathlib import Path
pkg = types.ModuleType("cleantune")  # the store alone, without the package's torch-importing __init__
pkg.__path__ = [sys.argv[4]]
sys.modules["cleantune"] = pkg
from cleantune.store import ResultStore
store, tag, go = ResultStore(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
for i in range(300):
    store.put(f"{tag}-{i}", {"dataset": "sst2", "i": i}, {"cacc": 0.5}, {"wall_s": 1.0}, {"python": "3"})
"""


def test_two_processes_writing_at_once_lose_no_rows(tmp_path):
    store = tmp_path / "s.sqlite"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), tag, str(go), SRC + "/cleantune"],
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    time.sleep(0.5)
    go.touch()  # both start writing at the same moment
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    ids = {r["id"] for r in ResultStore(store).runs()}
    assert ids == {f"{t}-{i}" for t in "ab" for i in range(300)}


def test_a_failure_never_replaces_a_stored_success(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    s.put("x", {"seed": 0}, {"cacc": 0.9}, {}, {})
    s.put("x", {"seed": 0}, {}, {}, {}, status="failed", error="boom")
    assert (s.get("x")["status"], s.get("x")["metrics"]) == ("ok", {"cacc": 0.9})
    s.put("y", {"seed": 0}, {}, {}, {}, status="failed", error="boom")
    s.put("y", {"seed": 0}, {"cacc": 0.8}, {}, {})  # a retried failure that now succeeds
    assert (s.get("y")["status"], s.get("y")["error"]) == ("ok", None)


def test_a_cell_failing_where_its_config_no_longer_resolves_is_still_recorded(tiny_model, tmp_path, monkeypatch):
    """Resolving reads the data: when that is what broke mid-sweep, the record keeps the id the grid planned."""
    from cleantune import sweep as sweep_module
    from cleantune.runner import RunConfig
    from cleantune.sweep import run_cell

    cell, = expand_grid({"model": tiny_model, "train_size": 64})

    def gone(*a, **k):
        raise OSError("data folder gone")

    monkeypatch.setattr(sweep_module, "run", gone)
    monkeypatch.setattr(RunConfig, "resolve", gone)
    record = run_cell(cell, str(tmp_path / "s.sqlite"))
    assert record["status"] == "failed" and record["id"] == cell.id and "data folder gone" in record["error"]
    assert ResultStore(tmp_path / "s.sqlite").get(cell.id)["status"] == "failed"


def test_named_options_merge_with_the_grid_wide_ones_and_a_list_of_words_is_one_trigger_value(tiny_model):
    # a defense's own options add to the grid's options; replacing them would drop weight_decay unnoticed
    cell, = expand_grid({"model": tiny_model, "options": {"weight_decay": 0.02},
                         "defense": [{"lora": {"options": {"lora_r": 4}}}]})
    assert (cell.resolved["weight_decay"], cell.resolved["lora_r"]) == (0.02, 4)
    # triggers are a list by nature: [cf, mn] is one cell with both triggers, not two cells
    cell, = expand_grid({"model": tiny_model, "triggers": ["cf", "mn"]})
    assert cell.config.triggers == ["cf", "mn"]


def test_a_named_defense_option_overrides_the_grid_wide_value_of_the_same_key(tiny_model):
    # the defense's own settings are the most specific: a grid-wide lora_r must not undo `lora: {lora_r: 4}`
    cell, = expand_grid({"model": tiny_model, "options": {"lora_r": 8, "weight_decay": 0.02},
                         "defense": [{"lora": {"options": {"lora_r": 4}}}]})
    assert (cell.resolved["lora_r"], cell.resolved["weight_decay"]) == (4, 0.02)


def test_an_empty_axis_is_an_error_not_a_sweep_of_nothing(tiny_model):
    # the cross product with an empty axis has no cell: the sweep would report success having run nothing
    for key in ("lr", "seed", "dataset", "defense"):
        with pytest.raises(UserError, match=f"grid: '{key}' lists no value"):
            expand_grid({"model": tiny_model, key: []})


def test_a_named_setting_cannot_set_another_named_axis(tiny_model):
    # `lora: {attack: addsent}` would silently move the lora cells to another attack than the grid's
    for key, value in (("attack", "addsent"), ("dataset", "hsol"), ("defense", "finetune")):
        with pytest.raises(UserError, match=f"unknown key '{key}' in the settings of defense 'lora'"):
            expand_grid({"model": tiny_model, "defense": [{"lora": {key: value}}]})


def test_a_named_item_with_an_empty_settings_mapping_is_the_bare_name(tiny_model, tmp_path):
    # YAML reads `- lora:` (a name and a colon, nothing after it) as lora: null, which means no settings
    (tmp_path / "g.yaml").write_text(f"model: {tiny_model}\ndefense:\n  - lora:\n")
    cell, = load_grid(tmp_path / "g.yaml")
    assert cell.id == expand_grid({"model": tiny_model, "defense": "lora"})[0].id


def test_an_unset_attack_option_is_no_error_for_an_attack_it_does_not_fit(tiny_model):
    # `sentence: null` (as a config file writes "unset") is the default, not an AddSent option given to BadNets
    cell, = expand_grid({"model": tiny_model, "attack": "badnets", "sentence": None})
    assert cell.id == expand_grid({"model": tiny_model, "attack": "badnets"})[0].id


def test_worker_and_thread_counts_up_to_the_c_int_limit_are_accepted(tiny_model):
    # process and thread counts are C ints underneath: the largest one passes, one more is refused
    from cleantune.options import C_INT_MAX
    from cleantune.sweep import check_options

    assert C_INT_MAX == 2**31 - 1
    check_options(workers=C_INT_MAX, cpus_per_run=C_INT_MAX)
    for kw, name in (({"workers": 2**31}, "--workers"), ({"cpus_per_run": 2**31}, "--cpus-per-run")):
        with pytest.raises(UserError, match=f"{name} must be at most {C_INT_MAX}, got {2**31}"):
            check_options(**kw)


def test_sweep_retries_failed_cells_skips_ok_ones_and_splits_the_cores(tiny_model, tmp_path, monkeypatch):
    from cleantune import sweep as sweep_module

    a, b = expand_grid({"model": tiny_model, "seed": [0, 1]})
    store = ResultStore(tmp_path / "s.sqlite")
    store.put(a.id, a.resolved, {}, {}, {}, status="failed", error="boom")
    store.put(b.id, b.resolved, {"cacc": 0.9}, {}, {})
    store.put("other", {"seed": 9}, {"cacc": 0.5}, {}, {})  # another grid's run in the same store
    calls = []

    def fake_local(cells, store_path, workers, threads):  # no training: what the sweep hands its workers
        calls.append(([c.id for c in cells], workers, threads))
        for c in cells:
            yield {"config": c.resolved, "status": "ok"}

    monkeypatch.setattr(sweep_module, "_local", fake_local)
    monkeypatch.setattr(sweep_module, "cpu_count", lambda: 8)
    summary = sweep([a, b], store.path, workers=2, progress=False)
    assert calls == [([a.id], 2, 4)]  # the failure runs again, the stored run does not; cores // workers
    assert (summary.skipped, summary.ran) == (1, 1)  # of this grid's cells, not every row in the store
    sweep([a, b], store.path, workers=2, cpus_per_run=3, progress=False)
    assert calls[-1] == ([a.id], 2, 3)


def test_dry_run_lines_name_the_settings_that_tell_alike_cells_apart(tiny_model, tmp_path, capsys):
    grid = write_grid(tmp_path / "g.yaml", tiny_model, defense=["finetune", "lora"], lr=[1e-4, 2e-3])
    assert main(["sweep", str(grid), "--store", str(tmp_path / "s.sqlite"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert len(lines) == 4 and len({line.split(None, 3)[3] for line in lines}) == 4  # no two read alike
    assert sorted(line.split("  ", 1)[1].split(None, 1)[1] for line in lines) == [
        "sst2 badnets finetune seed=0 lr=0.0001", "sst2 badnets finetune seed=0 lr=0.002",
        "sst2 badnets lora seed=0 lr=0.0001", "sst2 badnets lora seed=0 lr=0.002"]


WORKER_DIES = """
import os, sys, time
import cleantune.sweep as S
from cleantune.cli import main


def dies_on_seed_1(config, store, resume=False, progress=False):
    if config.seed == 1:
        deadline = time.time() + 120
        while not store.runs() and time.time() < deadline:  # after seed 0's cell has finished and been stored
            time.sleep(0.2)
        time.sleep(1)  # and the sweep has taken its result
        os._exit(137)  # as the kernel's OOM killer leaves a worker: no exception, no cleanup
    raise ValueError("seed 0 fails as a cell may")  # a failed cell is stored like a finished one


S.run = dies_on_seed_1  # the spawned workers import this file again as __mp_main__, patched alike
if __name__ == "__main__":
    sys.exit(main(["sweep", sys.argv[1], "--store", sys.argv[2], "--workers", "2", "--no-progress"]))
"""


def test_a_worker_that_dies_stops_the_sweep_in_one_line_and_keeps_the_finished_cells(tiny_model, tmp_path):
    grid = write_grid(tmp_path / "g.yaml", tiny_model, defense="finetune", seed=[0, 1])
    (tmp_path / "dies.py").write_text(WORKER_DIES)
    store = tmp_path / "s.sqlite"
    p = subprocess.run([sys.executable, str(tmp_path / "dies.py"), str(grid), str(store)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.splitlines() == [  # the failed cell as it finished, then why the sweep stopped
        "FAILED sst2 badnets finetune seed=0: ValueError: seed 0 fails as a cell may",
        "cleantune: error: a sweep worker process died (out of memory?); finished runs are stored: run the same "
        "sweep again to continue"], p.stderr[-3000:]
    runs = ResultStore(store).runs()
    assert [(r["config"]["seed"], r["status"]) for r in runs] == [(0, "failed")]
    assert "seed 0 fails as a cell may" in runs[0]["error"]


INTERRUPTED = """
import os, signal, sys, time
import cleantune.sweep as S
from cleantune.runner import RunConfig

LOG = sys.argv[1]


def slow_run(config, store, resume=False, progress=False):  # a cell that trains for a long time
    with open(LOG, "a") as f:
        f.write(f"start {config.seed}, pid {os.getpid()}, SIGINT {'ignored' if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else 'taken'}\\n")
    try:  # long enough that the first cell is still running when a loaded machine starts the second worker
        time.sleep(300)
    except KeyboardInterrupt:
        with open(LOG, "a") as f:
            f.write("worker interrupted\\n")
        raise


S.run = slow_run  # the spawned workers import this file again as __mp_main__, patched alike
if __name__ == "__main__":
    # as a sweep started from a terminal: a test run started in the background (`pytest &`) ignores Ctrl-C,
    # and so would every process it starts
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cells = [S.Cell(RunConfig(seed=i), f"id{i}", {}) for i in range(6)]
    try:
        S.sweep(cells, sys.argv[2], workers=2, progress=False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_a_sweep_in_this_process_interrupted_before_storing_anything_leaves_no_store(tmp_path, monkeypatch):
    """The cell's own connection, kept open by the traceback, read as another process's: the new store stayed."""
    import cleantune.sweep as sweep_module
    from cleantune.sweep import Cell

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run", interrupted)
    monkeypatch.setattr(sweep_module, "_warm_up", lambda: None)
    with pytest.raises(KeyboardInterrupt):
        sweep([Cell(config=None, id="abc", resolved={})], tmp_path / "s.sqlite", workers=1, progress=False)
    assert not list(tmp_path.glob("s.sqlite*"))


def start_interrupted_sweep(tmp_path, script=INTERRUPTED, stdout=subprocess.PIPE, stderr=None):
    """The sweep of `script` in a session of its own, once both of its workers have started a cell; and its log."""
    (tmp_path / "interrupted.py").write_text(script)
    log = tmp_path / "log"
    log.touch()
    p = subprocess.Popen([sys.executable, str(tmp_path / "interrupted.py"), str(log), str(tmp_path / "s.sqlite")],
                         stdout=stdout, stderr=stderr, text=True, start_new_session=True)
    deadline = time.time() + 120
    while log.read_text().count("start") < 2 and time.time() < deadline:
        time.sleep(0.2)
    return p, log


def output_within(p, seconds: float) -> str:
    """What `p` printed, once it has exited; a sweep still running then fails the test with its process tree,
    and its session is killed."""
    try:
        return p.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        tree = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,cmd", "-s", str(p.pid)], capture_output=True,
                              text=True).stdout
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"the sweep had not exited {seconds} s after Ctrl-C; its session:\n{tree}")


def test_ctrl_c_stops_a_sweep_without_starting_a_queued_cell(tmp_path):
    p, log = start_interrupted_sweep(tmp_path)
    assert log.read_text().count("start") == 2
    t0 = time.time()
    os.killpg(p.pid, signal.SIGINT)  # as Ctrl-C: the whole foreground group
    out = output_within(p, 120)
    # the pool had handed a third cell to a worker ahead of time; it must not start and be waited for
    assert "interrupted" in out and time.time() - t0 < 30
    time.sleep(1)
    # only the sweep takes Ctrl-C: a worker that took it too would return it as its cell's result and could
    # start the next queued cell before the sweep stops it
    text = log.read_text()
    assert text.count("start") == text.count("SIGINT ignored") == 2 and "worker interrupted" not in text
    assert not list(tmp_path.glob("s.sqlite*"))  # the sweep created the store and stored nothing: none is left


def test_ctrl_c_leaves_no_semaphore_of_a_progress_bar_behind(tmp_path):
    """A cell's tqdm bar (a run's, even disabled) took a multiprocessing lock in the worker; the sweep stops its
    workers with SIGTERM, so nothing released it and Python's resource tracker warned as the sweep exited."""
    barred = INTERRUPTED.replace("    try:  # long enough", "    from tqdm.auto import tqdm\n"
                                 "    list(tqdm(range(2), disable=True))\n"
                                 "    try:  # long enough")
    p, log = start_interrupted_sweep(tmp_path, barred, stderr=subprocess.STDOUT)
    os.killpg(p.pid, signal.SIGINT)
    out = output_within(p, 120)  # to the end of the pipe, which the resource tracker's process holds too
    assert "interrupted" in out and "leaked semaphore" not in out, out


def test_ctrl_c_stops_a_sweep_whose_cells_ignore_sigterm(tmp_path):
    stubborn = INTERRUPTED.replace("    try:  # long enough", "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                   "    try:  # long enough")
    p, log = start_interrupted_sweep(tmp_path, stubborn)
    pids = [int(x) for x in re.findall(r"pid (\d+)", log.read_text())]
    assert len(pids) == 2
    t0 = time.time()
    os.killpg(p.pid, signal.SIGINT)
    out = output_within(p, 120)  # before: the pool's thread waited at exit for the cells' 300 s
    assert "interrupted" in out and time.time() - t0 < 30
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # killed, and reaped by the sweep


def test_workers_stop_when_their_sweep_is_killed(tmp_path):
    p, log = start_interrupted_sweep(tmp_path, stdout=subprocess.DEVNULL)
    pids = [int(x) for x in re.findall(r"pid (\d+)", log.read_text())]
    assert len(pids) == 2
    p.kill()  # SIGKILL: the sweep cannot stop them itself
    p.wait()

    def alive(pid):  # a zombie has stopped; whoever adopted it may not have reaped it yet
        status = Path(f"/proc/{pid}/status")
        try:
            return "zombie" not in status.read_text()
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while any(map(alive, pids)) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left  # their cells would otherwise train on, 300 s here, and the workers then wait for good


def test_a_damaged_row_of_another_run_does_not_stop_a_sweep(tiny_model, tmp_path, capsys):
    grid = write_grid(tmp_path / "g.yaml", tiny_model)
    store = ResultStore(tmp_path / "s.sqlite")
    store.put("other", {"dataset": "sst2"}, {"cacc": 0.5}, {}, {})
    store.conn.execute("UPDATE runs SET config = '{bad' WHERE id = 'other'")
    store.conn.commit()
    assert main(["sweep", str(grid), "--store", str(store.path), "--dry-run"]) == 0
    assert "2 cells, 0 stored" in capsys.readouterr().out
    assert store.stored_ids() == {"other"}  # what a sweep skips, read without the damaged columns


def test_a_named_setting_wins_over_every_axis_the_seed_list_too(tiny_model):
    # an entry's own settings override the grid-wide values (docs/sweep.md): a defense's own seed lost to a list
    # of seeds (its cells ran the list's seeds without a word) while it won over a single seed and over any
    # other list (epochs)
    named = ["finetune", {"lora": {"seed": 5, "epochs": 4}}]
    for grid in ({"seed": [0, 1], "epochs": [1, 2]}, {"seed": 0, "epochs": 1}):
        cells = expand_grid({"model": tiny_model, "defense": named, **grid})
        lora = {(c.config.seed, c.config.epochs) for c in cells if c.config.defense == "lora"}
        assert lora == {(5, 4)}
        seeds = grid["seed"] if isinstance(grid["seed"], list) else [grid["seed"]]
        assert {c.config.seed for c in cells if c.config.defense == "finetune"} == set(seeds)
    # seeds still vary fastest: every seed of a cell runs before the next cell
    cells = expand_grid({"model": tiny_model, "defense": ["finetune", "lora"], "seed": [0, 1]})
    assert [(c.config.defense, c.config.seed) for c in cells] == [("finetune", 0), ("finetune", 1), ("lora", 0),
                                                                   ("lora", 1)]
