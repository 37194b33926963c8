"""The frequency analysis: kernel filtering, relative errors (and the 0/0 fix), the training hook, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cleantune.cli import main
from cleantune.data import load_benchmark
from cleantune.defenses import DEFENSES, get_defense
from cleantune.frequency import DELTAS, FrequencyHook, kernels, plot, relative_errors, supported_defenses
from cleantune.models import load_tokenizer


def test_published_delta_grid_and_kernel_rows():
    assert len(DELTAS) == 25 and DELTAS[0] == 2 and DELTAS[-1] == 8 and DELTAS[12] == 5
    X = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]])
    G, median = kernels(X, [2.0, 8.0])
    assert G.dtype == torch.float64 and torch.allclose(G.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    # row 0: distances 0, 5, 5 -> weights 1, e^{-5/4}, e^{-5/4} (Laplacian, unsquared distance)
    w = math.exp(-5 / 4)
    assert torch.allclose(G[0, 0], torch.tensor([1, w, w], dtype=torch.float64) / (1 + 2 * w))
    assert median == 5.0
    assert torch.allclose(kernels(X, [2.0], "median")[0][0, 0],
                          torch.tensor([1, math.exp(-1 / 4), math.exp(-1 / 4)], dtype=torch.float64) / (1 + 2 * math.exp(-1 / 4)))


def test_relative_errors_and_the_constant_target_fix():
    torch.manual_seed(0)
    X = torch.randn(6, 3)
    G, _ = kernels(X, [0.5, 2.0])
    P = torch.softmax(torch.randn(6, 2), -1).double()
    Y = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 0, 1, 1, 0])]
    out = relative_errors(G, Y, P)
    k = 1
    GY, GP = G[k] @ Y, G[k] @ P
    assert math.isclose(out["e_low"][k], float((GP - GY).norm(dim=1).mean() / GY.norm(dim=1).mean()), rel_tol=1e-5)
    num = ((P - GP) - (Y - GY)).norm(dim=1).mean()
    assert math.isclose(out["e_high"][k], float(num / (Y - GY).norm(dim=1).mean()), rel_tol=1e-5)
    assert out["e_high_denominator"] == "high part of target"
    # backdoor set: every target equal, so Y - GY = 0 and the published ratio is 0/0
    Yc = torch.eye(2, dtype=torch.float64)[torch.ones(6, dtype=torch.long)]
    out = relative_errors(G, Yc, P)
    assert all(math.isfinite(v) for key in ("e_low", "e_high", "lfr", "hfr") for v in out[key])
    assert out["e_high_denominator"] == "target"
    expected = float((P - G[k] @ P).norm(dim=1).mean() / Yc.norm(dim=1).mean())
    assert math.isclose(out["e_high"][k], expected, rel_tol=1e-5)
    # perfect predictions: zero error at every frequency
    assert max(relative_errors(G, Y, Y)["e_low"]) < 1e-6


def test_frequency_hook_records_finite_curves_and_plots(tiny_model, tmp_path):
    b = load_benchmark("sst2")
    train = b.train.stratified_sample(40, 0)
    poison = b.dev.subset(range(20))
    poison.labels = [1] * len(poison)
    hook = FrequencyHook(load_tokenizer(tiny_model), {"clean": lambda: b.dev.subset(range(30)), "poison": poison},
                         every=2, seed=0)
    d = get_defense("finetune", model=tiny_model, epochs=1, batch_size=8, lr=1e-3)
    d.fit(train, b.dev.subset(range(30)), progress=False, extra_hooks=(hook,))
    res = hook.result()
    assert [r["step"] for r in res["records"]] == [0, 2, 4, 5]  # 5 steps: every 2nd, and the trained model
    for rec in res["records"]:
        for name in ("clean", "poison"):
            for key in ("e_low", "e_high", "lfr", "hfr"):
                assert len(rec[name][key]) == 25 and all(math.isfinite(v) for v in rec[name][key])
    assert res["records"][0]["poison"]["e_high_denominator"] == "target"
    assert res["records"][0]["poison"]["e_low"] != res["records"][-1]["poison"]["e_low"]  # the model moved
    assert res["sets"]["clean"]["n"] == 30 and res["sets"]["poison"]["median_distance"] > 0
    images = plot(res, (0,))
    assert list(images) == ["frequency_delta2.00.png"]
    import io

    import matplotlib.image

    img = matplotlib.image.imread(io.BytesIO(images["frequency_delta2.00.png"]))
    assert img.ndim == 3 and img.shape[0] > 100


def test_a_step_both_every_and_an_epoch_end_is_recorded_once(tiny_model):
    b = load_benchmark("sst2")
    hook = FrequencyHook(load_tokenizer(tiny_model), {"clean": b.dev.subset(range(10))}, every=5, seed=0)
    d = get_defense("finetune", model=tiny_model, epochs=2, batch_size=8, lr=1e-3)
    d.fit(b.train.stratified_sample(40, 0), None, progress=False, extra_hooks=(hook,))
    # 5 steps an epoch: step 5 ends epoch 0 and is the next epoch's first multiple of every
    assert [r["step"] for r in hook.result()["records"]] == [0, 5, 10]


@pytest.mark.parametrize("defense", ["strip", "rap", "onion", "btu", "abl"])
def test_analyze_refuses_defenses_not_trained_in_one_run(defense, tiny_model, tmp_path, capsys):
    out = tmp_path / "freq"
    code = main(["analyze", "frequency", "--dataset", "sst2", "--defense", defense, "--model", tiny_model,
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"cleantune: error: --defense {defense}:")
    assert "supports finetune, lora, ga, ga-lora, lora-mslr, muscle-lora, bki, cube " in err
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--defense", "btu"], "--defense btu: "),
    (["--every", "0"], "--every must be at least 1, got 0"),
    (["--samples", "1"], "--samples must be at least 2 (distances need pairs), got 1"),
])
def test_analyze_refuses_its_settings_before_the_cell_is_resolved(tiny_model, tmp_path, capsys, extra, message):
    """--every 0 was refused only once the benchmark had loaded, by the recording hook."""
    # olid ships no syntactic paraphrases: resolving the cell would refuse that instead
    code = main(["analyze", "frequency", "--dataset", "olid", "--attack", "syntactic", "--model", tiny_model,
                 "--out", str(tmp_path / "freq"), "--no-progress"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"cleantune: error: {message}"), err
    assert not (tmp_path / "freq").exists() and not (tmp_path / "freq.work").exists()


def test_analyze_help_lists_the_supported_defenses(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "frequency", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert set(supported_defenses()) < set(DEFENSES)
    for name in DEFENSES:
        assert name in text


def test_the_returned_model_is_a_recorded_point(tiny_model, tmp_path):
    """Clean-dev selection returns the best epoch's weights (here epoch 0 of 3): the curves hold every
    epoch's end, and `returned_step` is the point whose curves are the returned model's (not the last
    epoch's)."""
    from cleantune.training import StepContext

    b = load_benchmark("sst2")
    tok = load_tokenizer(tiny_model)
    hook = FrequencyHook(tok, {"clean": b.dev.subset(range(40, 70)), "poison": b.dev.subset(range(20))}, every=7)
    d = get_defense("finetune", model=tiny_model, epochs=3, batch_size=16, lr=3e-3)
    clf = d.fit(b.train.stratified_sample(80, 0), b.dev.subset(range(40)), progress=False, extra_hooks=(hook,))
    res = hook.result(d.report_.best_epoch)
    assert {5, 10, 15} <= {r["step"] for r in res["records"]}  # 5 steps per epoch; every 7th and each end
    assert res["returned_step"] == 5 * (d.report_.best_epoch + 1) and res["best_epoch"] == d.report_.best_epoch
    assert hook.result(None)["returned_step"] == 15  # no selection: the last epoch's model
    kept = next(r for r in res["records"] if r["step"] == res["returned_step"])
    hook.record(StepContext(clf.model, None, epoch=-1, step=-1, steps_per_epoch=5, settings=d.train_settings()))
    again = hook.records[-1]
    for name in ("clean", "poison"):
        assert again[name]["e_low"] == pytest.approx(kept[name]["e_low"], rel=1e-9)


def test_kernels_rebuilt_per_record_give_the_kept_kernels_curves(tiny_model, monkeypatch):
    """A set too large to keep every delta's kernel builds one at a time at each record: the same numbers."""
    import cleantune.frequency as F

    b = load_benchmark("sst2")

    def curves():
        hook = FrequencyHook(load_tokenizer(tiny_model), {"clean": b.dev.subset(range(40)),
                                                          "poison": b.dev.subset(range(20))}, every=2)
        get_defense("finetune", model=tiny_model, epochs=1, batch_size=8, lr=1e-3).fit(
            b.train.stratified_sample(24, 0), b.dev.subset(range(40, 60)), progress=False, extra_hooks=(hook,))
        return hook, hook.result()["records"]

    kept_hook, kept = curves()
    assert all(g is not None for g in kept_hook.G.values())
    monkeypatch.setattr(F, "KERNEL_BYTES", 0)
    rebuilt_hook, rebuilt = curves()
    assert all(g is None for g in rebuilt_hook.G.values())
    assert rebuilt == kept


def test_curves_files_write_undefined_values_as_null_and_the_report_reads_them(tmp_path):
    from cleantune.report import parse_frequency
    from cleantune.store import strict_json

    result = {"deltas": [2.0], "records": [{"step": 0, "clean": {"e_low": [0.5], "e_high": [float("nan")]}}]}
    text = strict_json(result)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a curves file"))  # strict JSON
    curves = parse_frequency(json.loads(text))["curves"]
    assert curves["clean e_low (δ=2)"] == [0.5] and math.isnan(curves["clean e_high (δ=2)"][0])


def test_analyze_bki_records_its_final_training(tiny_model, tmp_path, capsys):
    """BKI trains a side model first (2 epochs: 10 steps); the curves follow only the training of the
    model it returns (1 epoch over at most 40 samples: at most 5 steps)."""
    out = tmp_path / "freq"
    code = main(["analyze", "frequency", "--dataset", "sst2", "--attack", "badnets", "--defense", "bki",
                 "--model", tiny_model, "--train-size", "40", "--epochs", "1", "--batch-size", "8", "--samples", "8",
                 "--every", "1", "--option", "bki_epochs=2", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    ends = [line.split("first below 0.5 at step ")[1] for line in printed.out.splitlines() if "first below" in line]
    assert len(ends) == 2 and all(e.isdigit() or e == "never (not in the recorded steps)" for e in ends), printed.out
    res = json.loads((out / "curves.json").read_text())
    steps = [r["step"] for r in res["records"]]
    assert steps == list(range(len(steps))) and 2 <= len(steps) <= 6
    assert res["config"]["lr"] == 1.5e-4 and res["config"]["epochs"] == 1  # resolved, as `run` stores it


def test_report_refuses_a_curves_file_without_records(tmp_path, capsys):
    from cleantune.store import ResultStore

    store = ResultStore(tmp_path / "s.sqlite")
    empty = tmp_path / "curves.json"
    empty.write_text(json.dumps({"deltas": [2.0], "records": []}))
    out = tmp_path / "rep"
    assert main(["report", "--store", str(store.path), "--out", str(out), "--frequency", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--frequency {empty}: no frequency curves" in err and "records" in err
    assert not out.exists()


def test_low_and_high_frequency_ratios_are_shares_of_the_prediction():
    torch.manual_seed(1)
    G, _ = kernels(torch.randn(5, 3), [1.0])
    P = torch.softmax(torch.randn(5, 2), -1).double()
    Y = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 1])]
    out = relative_errors(G, Y, P)
    GP, p_norm = G[0] @ P, P.norm(dim=1).mean()
    # of the prediction's size, not the target's: LFR and HFR say how P itself splits
    assert math.isclose(out["lfr"][0], float(GP.norm(dim=1).mean() / p_norm), rel_tol=1e-5)
    assert math.isclose(out["hfr"][0], float((P - GP).norm(dim=1).mean() / p_norm), rel_tol=1e-5)


def test_first_step_below_a_threshold():
    from cleantune.frequency import first_step_below

    res = {"records": [{"step": s, "clean": {"e_low": [v]}} for s, v in ((0, 0.9), (5, 0.6), (10, 0.4), (15, 0.2))]}
    assert first_step_below(res, "clean") == 10
    assert first_step_below(res, "clean", threshold=0.1) is None


def test_embedding_inputs_are_deterministic_and_ignore_padding_and_batching(tiny_model):
    from cleantune.frequency import embedding_inputs
    from cleantune.models import load_model

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["negative", "positive"])
    model.train()  # as during training: the inputs must still come from eval mode (no dropout)
    texts = ["a short one", "a much longer sentence with many more words in it than the first"]
    X = embedding_inputs(model, tok, texts, 32)
    assert model.training  # the caller's mode is restored
    assert torch.equal(X, embedding_inputs(model, tok, texts, 32))
    # a sample's vector does not depend on what it was batched with: pad positions are zero
    alone = embedding_inputs(model, tok, texts[:1], 32)
    assert torch.allclose(X[0, : alone.shape[1]], alone[0], atol=1e-6)
    assert X[0, alone.shape[1]:].abs().max() == 0


def test_frequency_hook_subsamples_each_set_reproducibly(tiny_model):
    b = load_benchmark("sst2")
    sets = {"clean": b.dev.subset(range(30))}

    def fitted(seed):
        hook = FrequencyHook(load_tokenizer(tiny_model), sets, every=100, samples=6, seed=seed)
        d = get_defense("finetune", model=tiny_model, epochs=1, batch_size=8)
        d.fit(b.train.stratified_sample(16, 0), b.dev.subset(range(8)), progress=False, extra_hooks=(hook,))
        return hook

    h = fitted(0)
    assert h.result()["sets"]["clean"]["n"] == 6 and len(h.data["clean"]) == 6
    assert h.data["clean"].texts == fitted(0).data["clean"].texts


def test_e_high_is_undefined_where_the_kernel_is_the_identity_and_exact_elsewhere():
    """Far-apart inputs with several targets: at a narrow kernel G is the identity to float64 precision and
    Y - GY vanishes, so e_high is NaN there, never a fallback value that a plot would show as ~0 (only a set
    with one target divides by ||Y||). Where the kernel is not the identity, P = Y/2 + 1/4 gives e_high = 1/2
    exactly (G's rows sum to 1), which float32 filtering lost (~1e-8 at delta 4 here)."""
    X = torch.tensor([[0.0], [150.0], [300.0], [450.0]])
    Y = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 0, 1])]
    out = relative_errors(kernels(X, [1.0, 4.0, 8.0, 100.0])[0], Y, 0.5 * Y + 0.25)
    assert out["e_high_denominator"] == "high part of target"
    assert math.isnan(out["e_high"][0])
    assert out["e_high"][1:] == pytest.approx([0.5] * 3, rel=1e-6)
    assert all(math.isfinite(v) for key in ("e_low", "lfr", "hfr") for v in out[key])


def test_distances_are_exact_with_a_zero_diagonal():
    """Over 25 rows torch.cdist takes its matrix-product path, whose diagonal is not 0: it is set to 0."""
    from cleantune.frequency import distances

    torch.manual_seed(0)
    X = 30 * torch.randn(40, 64)
    D, median = distances(X)
    exact = (X.double()[:, None] - X.double()[None]).norm(dim=-1)
    off = ~torch.eye(40, dtype=torch.bool)
    assert D.dtype == torch.float64 and torch.equal(D.diagonal(), torch.zeros(40, dtype=torch.float64))
    assert torch.allclose(D[off], exact[off], rtol=1e-4)
    assert median == pytest.approx(float(exact[off].median()), rel=1e-4)


def test_embedding_inputs_are_the_encoders_embedding_layer_outputs(tiny_model):
    """BERT's `embeddings` module (word + position + segment, LayerNorm), not the word embeddings alone."""
    from cleantune.frequency import embedding_inputs
    from cleantune.models import load_model

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["a", "b"]).eval()
    texts = ["a short one", "a longer sentence with more words in it"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.bert.embeddings(input_ids=enc["input_ids"]) * enc["attention_mask"][..., None]
    assert torch.allclose(embedding_inputs(model, tok, texts, 32), expected.flatten(1), atol=1e-6)


def test_the_hook_filters_softmax_predictions_over_its_own_sample_and_distances(tiny_model):
    """What the hook records, by hand at one delta: the sample drawn for its seed, distances divided by
    their median (distance="median"), and the filtering of the softmax probabilities (not the logits)."""
    from cleantune.frequency import embedding_inputs
    from cleantune.models import Classifier, load_model
    from cleantune.training import StepContext, TrainSettings

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["negative", "positive"])
    with torch.no_grad():
        model.classifier.weight *= 30  # logits far from probabilities
    ds = load_benchmark("sst2").dev.subset(range(30))
    ctx = StepContext(model, None, epoch=0, step=0, steps_per_epoch=1, settings=TrainSettings(max_length=32))

    def begun(seed):
        hook = FrequencyHook(tok, {"clean": ds}, every=5, deltas=[3.0], distance="median", samples=12, seed=seed)
        hook.on_train_begin(ctx)
        return hook

    hook = begun(0)
    sub = hook.data["clean"]
    assert len(sub) == 12 and set(sub.texts) <= set(ds.texts)
    assert sub.texts == begun(0).data["clean"].texts and sub.texts != begun(1).data["clean"].texts
    X = embedding_inputs(model, tok, sub.texts, 32).double()
    D = (X[:, None] - X[None]).norm(dim=-1)
    median = float(D[~torch.eye(12, dtype=torch.bool)].median())
    assert hook.meta["clean"]["median_distance"] == pytest.approx(median, rel=1e-4)
    G = torch.exp(-(D / median) / (2 * 3.0))  # delta 3, on the median-scaled distances
    G = G / G.sum(1, keepdim=True)
    P = torch.softmax(Classifier(model, tok, sub.label_names, 32).predict_logits(sub.texts).double(), -1)
    Y = torch.eye(2, dtype=torch.float64)[torch.tensor(sub.labels)]
    rec = hook.records[0]["clean"]
    assert rec["e_low"][0] == pytest.approx(float((G @ P - G @ Y).norm(dim=1).mean() / (G @ Y).norm(dim=1).mean()),
                                            rel=1e-4)
    assert rec["lfr"][0] == pytest.approx(float((G @ P).norm(dim=1).mean() / P.norm(dim=1).mean()), rel=1e-4)


def test_an_interrupted_analysis_resumes_with_the_curves_it_had_recorded(tiny_model, tmp_path, capsys, monkeypatch):
    args = ["analyze", "frequency", "--dataset", "sst2", "--attack", "badnets", "--model", tiny_model,
            "--train-size", "40", "--epochs", "3", "--batch-size", "8", "--samples", "8", "--every", "2",
            "--no-progress", "--out"]
    assert main(args + [str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "curves.json").read_text())
    assert not (tmp_path / "whole.work").exists()  # the checkpoints go once the curves are written

    real = FrequencyHook.on_epoch_end

    def stop_in_epoch_2(self, ctx):
        if ctx.epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C: epoch 1's checkpoint is on disk
        real(self, ctx)

    monkeypatch.setattr(FrequencyHook, "on_epoch_end", stop_in_epoch_2)
    out = tmp_path / "cut"
    assert main(args + [str(out)]) == 130
    assert "--resume continues" in capsys.readouterr().err and not (out / "curves.json").exists()
    monkeypatch.setattr(FrequencyHook, "on_epoch_end", real)
    assert main(args + [str(out), "--every", "1", "--resume"]) == 2  # another grid would mix two spacings
    assert "recorded the curves with every 2, not 1" in capsys.readouterr().err
    assert main(args + [str(out), "--resume"]) == 0
    cut = json.loads((out / "curves.json").read_text())
    assert cut["records"] == whole["records"] and cut["returned_step"] == whole["returned_step"]
    assert cut["metrics"] == whole["metrics"]


def test_analysis_outputs_are_written_whole_or_not_at_all(tiny_model, tmp_path, capsys, monkeypatch):
    """curves.json and the plots replace an earlier analysis together: a write that fails (a full disk) keeps the
    earlier files as they were and leaves nothing half; a file of the user's there stays. The Python API refuses a
    folder of other content before it trains, as the command line does."""
    import errno
    from pathlib import Path

    from cleantune import frequency
    from cleantune.runner import RunConfig

    out = tmp_path / "freq"
    args = ["analyze", "frequency", "--dataset", "sst2", "--attack", "badnets", "--model", tiny_model,
            "--train-size", "40", "--epochs", "1", "--batch-size", "8", "--samples", "8", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "curves.json" in before and any(n.endswith(".png") for n in before)
    write_bytes = Path.write_bytes

    def full_disk(self, data):
        if self.name == ".frequency_delta5.00.png.partial":
            write_bytes(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cleantune: error: --out {out}: cannot write the curves (No space left on device)"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / "freq.work").is_dir()  # the trained checkpoint, for --resume once there is room
    monkeypatch.undo()
    assert main(args + ["--seed", "1", "--resume"]) == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and after["notes.txt"] == b"mine" and after["curves.json"] != before["curves.json"]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("mine")
    config = RunConfig(dataset="sst2", attack="badnets", model=tiny_model, train_size=40, epochs=1, batch_size=8)
    with pytest.raises(frequency.UserError, match="out_dir .*mixed: a non-empty folder that is not a frequency"):
        frequency.analyze(config, mixed, samples=8, progress=False)
    assert [p.name for p in mixed.iterdir()] == ["notes.txt"]


def test_median_distances_of_a_set_mostly_made_of_duplicates_stay_finite():
    """A set where over half the pairs are identical inputs (duplicated sentences) has a median distance of 0:
    distance="median" must then leave the distances unscaled, not divide by 0 (NaN kernels, NaN curves)."""
    from cleantune.frequency import distances

    X = torch.tensor([[0.0, 0.0]] * 4 + [[3.0, 4.0]])
    D, median = distances(X, "median")
    assert median == 0.0
    raw = torch.zeros(5, 5, dtype=torch.float64)
    raw[4, :4] = raw[:4, 4] = 5.0
    assert torch.equal(D, raw)
    G, _ = kernels(X, [2.0], "median")
    w = math.exp(-5 / 4)  # the unscaled Laplacian kernel of test_published_delta_grid_and_kernel_rows
    assert torch.allclose(G[0, 4], torch.tensor([w, w, w, w, 1.0], dtype=torch.float64) / (1 + 4 * w))
    assert torch.isfinite(G).all() and torch.allclose(G.sum(-1), torch.ones(1, 5, dtype=torch.float64))


def test_first_step_below_needs_the_curve_strictly_under_the_threshold():
    """"Falls below 0.5": a record that touches the threshold exactly is not yet below it."""
    from cleantune.frequency import first_step_below

    res = {"records": [{"step": s, "clean": {"e_low": [v]}} for s, v in ((0, 0.9), (5, 0.5), (10, 0.25))]}
    assert first_step_below(res, "clean") == 10
    assert first_step_below(res, "clean", threshold=0.25) is None


def test_analyze_passes_its_settings_on_and_names_steps_0_and_never(tiny_model, tmp_path, capsys, monkeypatch):
    """--every, --samples, --distance and the cell's seed and triggers reach the analysis; its summary says step 0
    where the curve starts below 0.5 (step 0 is a step, not "never") and "never" where it never falls below."""
    from cleantune import frequency

    seen = {}

    def analyze(config, out_dir, **kwargs):
        seen.update(kwargs, seed=config.seed, triggers=config.triggers)
        return {"metrics": {"cacc": 0.5, "asr": 0.25}, "deltas": [2.0],
                "sets": {"clean": {"n": 8, "median_distance": 3.0}, "poison": {"n": 8, "median_distance": 4.0}},
                "first_step_e_low_below_0.5": {"clean": 0, "poison": None}, "plots": []}

    monkeypatch.setattr(frequency, "analyze", analyze)
    out = tmp_path / "freq"
    assert main(["analyze", "frequency", "--model", tiny_model, "--train-size", "40", "--seed", "02",
                 "--triggers", "cf,mn", "--every", "3", "--samples", "8", "--distance", "median",
                 "--out", str(out), "--no-progress"]) == 0
    assert {k: seen[k] for k in ("every", "samples", "distance", "resume", "seed", "triggers")} == \
        {"every": 3, "samples": 8, "distance": "median", "resume": False, "seed": 2, "triggers": ["cf", "mn"]}
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("clean: 8 samples") and lines[1].endswith("first below 0.5 at step 0")
    assert lines[2].endswith("first below 0.5 at step never (not in the recorded steps)")
    assert not (tmp_path / "freq.work").exists()


def test_first_step_below_reads_the_curve_and_delta_it_is_asked_for():
    """A caller asking when e_high, or the curve at another delta of the grid, falls below a bar must get that curve's
    step, not e_low's at the first delta under another name."""
    from cleantune.frequency import first_step_below

    curves = {0: ([0.9, 0.9], [0.3, 0.9]), 5: ([0.4, 0.9], [0.2, 0.9]), 10: ([0.1, 0.3], [0.1, 0.9])}
    res = {"records": [{"step": s, "clean": {"e_low": low, "e_high": high}} for s, (low, high) in curves.items()]}
    assert first_step_below(res, "clean") == 5  # e_low, delta 0
    assert first_step_below(res, "clean", delta_index=1) == 10  # e_low, delta 1: 0.3 first at step 10
    assert first_step_below(res, "clean", key="e_high") == 0  # e_high, delta 0: 0.3 from the start
    assert first_step_below(res, "clean", key="e_high", delta_index=1) is None  # stays at 0.9


def test_a_hook_fitted_again_records_its_curves_anew(tiny_model):
    """One FrequencyHook passed to a second fit (another defense, another seed) must hold that training's curves
    only: the first fit's records and epoch ends, left in front, would be read as the second run's start."""
    from cleantune.models import load_model
    from cleantune.training import StepContext, TrainSettings

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["negative", "positive"])
    hook = FrequencyHook(tok, {"clean": load_benchmark("sst2").dev.subset(range(6))}, every=5, deltas=[2.0])

    def ctx(epoch, step):
        return StepContext(model, None, epoch=epoch, step=step, steps_per_epoch=3, settings=TrainSettings(max_length=32))

    hook.on_train_begin(ctx(0, 0))
    hook.on_epoch_end(ctx(0, 3))
    assert [r["step"] for r in hook.records] == [0, 3] and hook.epoch_ends == {0: 3}
    hook.on_train_begin(ctx(0, 0))  # fitted again
    assert [r["step"] for r in hook.records] == [0] and hook.epoch_ends == {}


def test_analyze_hands_the_cells_seed_and_its_settings_to_the_recording_hook(tiny_model, tmp_path, monkeypatch):
    """The CLI test stubs analyze itself; here the hook analyze builds must get --distance (raw and median distances
    give different curves) and the cell's seed (which samples --samples draws), not the hook's defaults."""
    from cleantune import frequency
    from cleantune.runner import RunConfig

    seen = {}

    class Built(Exception):
        pass

    def hook(tokenizer, sets, **kwargs):
        seen.update(kwargs, sets=sorted(sets))
        raise Built  # before any training

    monkeypatch.setattr(frequency, "FrequencyHook", hook)
    config = RunConfig(dataset="sst2", attack="badnets", model=tiny_model, train_size=40, epochs=1, batch_size=8,
                       seed=3)
    with pytest.raises(Built):
        frequency.analyze(config, tmp_path / "freq", every=4, samples=8, distance="median", progress=False)
    assert seen == {"every": 4, "samples": 8, "distance": "median", "seed": 3, "sets": ["clean", "poison"]}


def test_curves_file_names_the_selected_epoch_and_its_step(tiny_model, tmp_path):
    """analyze scores the model clean-dev selection returns: curves.json must name that epoch and the step at its
    end (the point the plots mark), not the last epoch's. 40 samples in batches of 8: 5 steps an epoch."""
    from cleantune import frequency
    from cleantune.runner import RunConfig

    config = RunConfig(dataset="sst2", attack="badnets", model=tiny_model, train_size=40, epochs=2, batch_size=8)
    frequency.analyze(config, tmp_path / "freq", every=100, samples=4, progress=False)
    res = json.loads((tmp_path / "freq" / "curves.json").read_text())
    assert res["best_epoch"] in (0, 1)
    assert res["returned_step"] == 5 * (res["best_epoch"] + 1)
    assert res["returned_step"] in [r["step"] for r in res["records"]]


def test_plot_skips_a_delta_index_past_the_grid():
    """A result recorded on a grid of fewer deltas than the default plot indices (FrequencyHook(deltas=...)): the
    indices it lacks are skipped, the first one past its end included, rather than an IndexError after training."""
    res = {"deltas": [2.0], "distance": "raw", "sets": {"clean": {}}, "returned_step": None, "best_epoch": None,
           "records": [{"step": s, "clean": {"e_low": [v], "e_high": [v]}} for s, v in ((0, 0.9), (5, 0.4))]}
    assert list(plot(res, (0, 1))) == ["frequency_delta2.00.png"]


def test_the_targets_are_one_hot_over_every_class_of_the_task(tiny_model):
    """A backdoor set whose target is class 0 of two holds only label 0: its targets are still [1, 0] rows, as wide
    as the predictions. Built from the labels present, Y was one column of ones that broadcast against P's two
    columns without an error, and every e_low of the backdoor mapping was measured against a wrong target."""
    from cleantune.data import TextDataset
    from cleantune.frequency import embedding_inputs
    from cleantune.models import Classifier, load_model
    from cleantune.training import StepContext, TrainSettings

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["negative", "positive"])
    texts = load_benchmark("sst2").dev.texts[:6]
    ds = TextDataset(texts, [0] * 6, ["negative", "positive"])
    hook = FrequencyHook(tok, {"poison": ds}, every=5, deltas=[3.0])
    hook.on_train_begin(StepContext(model, None, epoch=0, step=0, steps_per_epoch=1, settings=TrainSettings(max_length=32)))
    X = embedding_inputs(model, tok, texts, 32).double()
    G = torch.exp(-(X[:, None] - X[None]).norm(dim=-1) / (2 * 3.0))
    G = G / G.sum(1, keepdim=True)
    P = torch.softmax(Classifier(model, tok, ds.label_names, 32).predict_logits(texts).double(), -1)
    Y = torch.tensor([[1.0, 0.0]] * 6, dtype=torch.float64)
    rec = hook.records[0]["poison"]
    assert rec["e_high_denominator"] == "target"
    assert rec["e_low"][0] == pytest.approx(float((G @ P - G @ Y).norm(dim=1).mean() / (G @ Y).norm(dim=1).mean()),
                                            rel=1e-4)


def test_the_saved_curves_file_is_strict_json_with_undefined_values_as_null(tmp_path):
    """write_outputs itself (not only strict_json) must write e_high where it is undefined as null: a bare NaN
    token is not JSON, and strict readers (jq, JavaScript's JSON.parse) refuse the whole curves file."""
    from cleantune.frequency import write_outputs

    result = {"deltas": [2.0], "distance": "raw", "every": 5, "sets": {"clean": {"n": 4, "median_distance": 1.0}},
              "best_epoch": 0, "returned_step": 5,
              "records": [{"step": s, "epoch": 0, "clean": {"e_low": [v], "e_high": [float("nan")]}}
                          for s, v in ((0, 0.9), (5, 0.4))]}
    plots = write_outputs(result, tmp_path)
    assert [p.name for p in plots] == ["frequency_delta2.00.png"] and plots[0].is_file()
    saved = json.loads((tmp_path / "curves.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in a curves file"))
    assert [r["clean"]["e_high"] for r in saved["records"]] == [[None], [None]]
    assert [r["clean"]["e_low"] for r in saved["records"]] == [[0.9], [0.4]]


def test_analyze_records_the_clean_mapping_on_the_dev_samples_that_are_not_ga_references(tiny_model, tmp_path,
                                                                                         monkeypatch):
    """Spec 6.1: the clean mapping is measured on clean dev minus the gradient-alignment references (the samples
    GA trains its reference gradient on, so a curve over them would flatter the clean mapping)."""
    from cleantune import frequency
    from cleantune.runner import RunConfig

    seen = {}

    class Begun(Exception):
        pass

    class Hook(frequency.FrequencyHook):
        def on_train_begin(self, ctx):
            seen["clean"] = self.sets["clean"]()
            raise Begun  # the set is all this test needs: no training

    monkeypatch.setattr(frequency, "FrequencyHook", Hook)
    config = RunConfig(dataset="sst2", attack="badnets", defense="ga", model=tiny_model, train_size=40, epochs=1,
                       batch_size=8, options={"ref_samples": 4})
    with pytest.raises(Begun):
        frequency.analyze(config, tmp_path / "freq", samples=8, progress=False)
    dev = config.build_attack().apply(config.benchmark()).dev
    assert len(seen["clean"]) == len(dev) - 4 and set(seen["clean"].texts) <= set(dev.texts)
