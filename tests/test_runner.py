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


def test_a_run_records_its_scores_counts_detection_and_timings_from_what_the_defense_did(monkeypatch):
    """What `run` adds around a defense's fit, with a stand-in fit whose every output is known: CACC and ASR on the
    right test sets, the poisoned-sample count (the 10 % of 100), detection scored against the attack's ground truth
    (train samples removed, test inputs rejected), and the timings: eval_s the evaluation only, wall_s with the
    training an interrupted session did before --resume, BTU's stage evaluations apart. These are the numbers
    `results` and the report print, and no other test looked at them."""
    import types

    from cleantune.defenses import FineTune
    from cleantune.training import TrainReport

    config = RunConfig(train_size=100)
    poisoned = config.build_attack().apply(config.benchmark())  # what the run draws: same data, same seed
    words = set(poisoned.trigger_words)
    clock = [0.0]  # the run's clock advances only where the stand-ins say so

    def has_trigger(text):
        return bool(words & set(text.split()))

    class Model:  # predicts the target (1) on a text with a trigger word, else 0; rejects those texts as well
        def predict(self, texts):
            clock[0] += 5.0  # 5 s per evaluated set
            return [int(has_trigger(t)) for t in texts]

        def flag(self, texts):
            return [has_trigger(t) for t in texts]

    def fit(self, train, clean_dev=None, **kwargs):
        clock[0] += 100.0  # this session's training
        # removed: every poisoned sample, and every tenth clean one
        self.flagged_ = [p or i % 10 == 0 for i, p in enumerate(train.poisoned)]
        self.report_ = TrainReport([], 0, 150.0, 1.0, 1.0, resumed_train_seconds=50.0)
        self.extra_metrics_ = {"btu_seconds": {"stage_eval": 7.0}}  # BTU's reporting-only evaluations
        return Model()

    monkeypatch.setattr(FineTune, "fit", fit)
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    r = runner.run(config, progress=False)
    m, t = r["metrics"], r["timings"]

    clean, triggered = poisoned.clean_test, poisoned.triggered_test
    assert m["cacc"] == pytest.approx(sum(int(has_trigger(x)) == y for x, y in zip(clean.texts, clean.labels)) / len(clean))
    assert m["asr"] == pytest.approx(sum(has_trigger(x) for x in triggered.texts) / len(triggered))
    assert (m["n_train"], m["n_poisoned"]) == (100, 10)
    n_poisoned = sum(poisoned.train.poisoned)
    extra = sum(1 for i, p in enumerate(poisoned.train.poisoned) if i % 10 == 0 and not p)  # clean ones removed too
    assert extra > 0
    assert m["train_detection"]["precision"] == pytest.approx(n_poisoned / (n_poisoned + extra))
    assert m["train_detection"]["recall"] == 1.0
    rejected_clean = sum(has_trigger(x) for x in clean.texts)
    assert m["test_detection"]["recall"] == pytest.approx(sum(has_trigger(x) for x in triggered.texts) / len(triggered))
    assert m["test_detection"]["frr"] == pytest.approx(rejected_clean / len(clean))
    assert m["test_detection"]["recall"] > 0.9 > m["test_detection"]["frr"]
    # 100 s of fit and two 5 s evaluations in this session, 50 s of training in the session before --resume
    assert t["eval_s"] == pytest.approx(10.0) and t["wall_s"] == pytest.approx(100.0 + 10.0 + 50.0)
    assert t["resumed_train_s"] == 50.0 and t["train_s"] == 150.0
    assert t["stage_eval_s"] == 7.0  # the report's time× subtracts it from wall_s
