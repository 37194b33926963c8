"""One benchmark cell: what its seed draws, what its id hashes, and which stored result it may reuse."""

import pytest

from cleantune import runner
from cleantune.runner import RunConfig
from cleantune.store import ResultStore, config_hash


def test_seed_draws_the_train_subsample():
    # seeds are repeats of an experiment: each must see its own subsample, not the same one
    a, b, c = (RunConfig(train_size=100, seed=s).benchmark().train for s in (0, 0, 1))
    assert len(a) == len(c) == 100
    assert a.texts == b.texts and a.texts != c.texts


def test_seed_reaches_the_attack():
    assert RunConfig(seed=5).build_attack().seed == 5
    bench = RunConfig(train_size=200).benchmark()  # one subsample, so only the attack's draw can differ
    flags = [RunConfig(seed=s, train_size=200).build_attack().apply(bench).train.poisoned for s in (0, 1)]
    assert sum(flags[0]) == sum(flags[1]) == 20 and flags[0] != flags[1]


def test_the_defense_selects_on_the_benchmark_dev_split_never_on_test(tiny_model, monkeypatch):
    from cleantune.defenses import FineTune

    seen = {}

    def fit(self, train, clean_dev=None, **kwargs):
        seen["dev"] = clean_dev
        raise KeyboardInterrupt  # what fit receives is all this test needs

    monkeypatch.setattr(FineTune, "fit", fit)
    config = RunConfig(model=tiny_model, train_size=100, epochs=1)
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, progress=False)
    bench = config.benchmark()
    assert seen["dev"].texts == bench.dev.texts and not set(seen["dev"].texts) & set(bench.test.texts)


def test_library_versions_are_part_of_the_run_id(monkeypatch):
    # a result computed by another cleantune (or torch) is another run, not one to reuse
    resolved = RunConfig(train_size=100).resolve()
    assert resolved["versions"]["cleantune"] == runner.__version__
    assert set(resolved["versions"]) == {"cleantune", "torch", "transformers", "peft"}
    monkeypatch.setattr(runner, "__version__", runner.__version__ + ".post1")
    assert config_hash(RunConfig(train_size=100).resolve()) != config_hash(resolved)


@pytest.fixture
def store(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    s.put("done", {"seed": 0}, {"cacc": 0.9, "asr": 0.1}, {"wall_s": 1.0}, {})
    s.put("crashed", {"seed": 1}, {}, {"wall_s": 1.0}, {}, status="failed", error="RuntimeError: out of memory")
    return s


def test_only_a_successful_stored_run_is_reused(store):
    # a failed cell runs again: reusing it would report the failure forever
    assert runner._stored(store, "crashed", force=False) is None
    got = runner._stored(store, "done", force=False)
    assert got["reused"] is True and got["status"] == "ok" and got["metrics"] == {"cacc": 0.9, "asr": 0.1}
    assert runner._stored(store, "done", force=True) is None
    assert runner._stored(None, "done", force=False) is None
    assert runner._stored(store, "never-ran", force=False) is None


def test_store_lists_runs_in_the_order_they_were_stored(tmp_path):
    s = ResultStore(tmp_path / "r.sqlite")
    for run_id in ("b", "a", "c"):  # ids are config hashes: their order means nothing to a reader
        s.put(run_id, {"seed": run_id}, {}, {}, {})
    assert [r["id"] for r in s.runs()] == ["b", "a", "c"]
    assert [r["id"] for r in ResultStore(tmp_path / "r.sqlite", readonly=True).runs()] == ["b", "a", "c"]


def test_data_dir_follows_xdg(tmp_path, monkeypatch):
    from cleantune.store import data_dir, default_store_path

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "d"))
    assert default_store_path() == tmp_path / "d" / "cleantune" / "results.sqlite"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for relative_or_empty in ("", "rel/data"):  # the XDG spec ignores these: else the store follows the cwd
        monkeypatch.setenv("XDG_DATA_HOME", relative_or_empty)
        assert data_dir() == tmp_path / "home" / ".local" / "share" / "cleantune"


def test_run_refuses_a_dict_config_and_a_path_as_store(tmp_path):
    """`run(config, "results.sqlite")` failed with an AttributeError ('str' object has no attribute 'get') after
    the checks, and a dict of settings with one ('dict' object has no attribute 'resolve')."""
    from cleantune.errors import UserError

    with pytest.raises(UserError, match=r"config must be a RunConfig, got dict \(write RunConfig\(\*\*settings\)\)"):
        runner.run({"dataset": "sst2"})
    with pytest.raises(UserError, match=r"store must be a ResultStore or None, got str \(write ResultStore\(path\)\)"):
        runner.run(RunConfig(train_size=100), str(tmp_path / "r.sqlite"), progress=False)
    assert not (tmp_path / "r.sqlite").exists()
