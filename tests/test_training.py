import os
import warnings

import pytest
import torch

from cleantune.data import TextDataset, load_benchmark
from cleantune.defenses import FineTune, LoRA
from cleantune.models import load_model, load_tokenizer
from cleantune.training import (StepHook, TrainSettings, batch_order, encode, predict_logits, process_batches,
                                seed_everything, train)
from helpers import InfGradAt, InfWeightsAt


@pytest.fixture(scope="module")
def small():
    b = load_benchmark("sst2")
    return b.train.stratified_sample(160, 0), b.dev.stratified_sample(64, 0)


def test_batch_order_covers_each_sample_once_and_groups_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    a = batch_order(lengths, 16, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert a == batch_order(lengths, 16, 0, 0, True) and a != batch_order(lengths, 16, 0, 1, True)
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)
    assert padded(a) < 0.6 * padded(batch_order(lengths, 16, 0, 0, False))
    # grouped batches come longest-first inside a mega-batch; unshuffled, every epoch would run long to short
    widths = [max(lengths[i] for i in b) for b in a]
    assert sum(x < y for x, y in zip(widths, widths[1:])) > len(widths) // 4


def test_every_process_takes_the_same_steps_with_fewer_batches_than_processes():
    # each step is a collective: a process with fewer steps waits for ever (3 processes, 1 batch: 1, 1 and 0)
    for n in range(1, 7):
        batches = [[i] for i in range(n)]
        for world in range(1, 5):
            shares = [process_batches(batches, world, r) for r in range(world)]
            assert [len(s) for s in shares] == [-(-n // world)] * world  # the loop's steps_per_epoch
            assert sorted({b[0] for s in shares for b in s}) == list(range(n))
    assert process_batches([[0], [1], [2]], 2, 1) == [[1], [0]]  # enough batches: topped up from the start, as before


def test_same_seed_same_model(tiny_model, small):
    train_data, dev = small
    runs = []
    for _ in range(2):
        d = FineTune(model=tiny_model, epochs=2, lr=1e-3, seed=7)
        clf = d.fit(train_data, dev, progress=False)
        runs.append((d.report_.history, clf.predict_logits(dev.texts)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    other = FineTune(model=tiny_model, epochs=2, lr=1e-3, seed=8).fit(train_data, dev, progress=False)
    assert not torch.equal(other.predict_logits(dev.texts), runs[0][1])


@pytest.mark.parametrize("user_setting", [None, ":16:8"])
def test_seeding_on_a_gpu_leaves_the_cublas_workspace_setting_to_the_user(user_setting, monkeypatch):
    # PyTorch re-parses CUBLAS_WORKSPACE_CONFIG at every cuBLAS call; a seeded run keeps deterministic kernels
    # without setting it, and quiets only PyTorch's warning about that variable
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append((a, k)))
    for name in ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp"):
        monkeypatch.setattr(torch.backends.cuda, name, lambda on: None)
    if user_setting:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", user_setting)
    else:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seed_everything(0)
        warnings.warn("Deterministic behavior was enabled with either `torch.use_deterministic_algorithms(True)` "
                      "or `at::Context::setDeterministicAlgorithms(true)`, but this operation is not deterministic "
                      "because it uses CuBLAS and you have CUDA >= 10.2.", UserWarning)
        warnings.warn("index_add_cuda_ does not have a deterministic implementation", UserWarning)
    assert calls == [((True,), {"warn_only": True})]
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == user_setting
    assert [str(w.message) for w in caught] == ["index_add_cuda_ does not have a deterministic implementation"]


def test_selection_restores_best_clean_dev_epoch(tiny_model, small):
    train_data, dev = small
    d = FineTune(model=tiny_model, epochs=3, lr=3e-3, seed=1)
    clf = d.fit(train_data, dev, progress=False)
    hist = d.report_.history
    best = max(range(3), key=lambda e: (hist[e]["dev_acc"], -e))
    assert d.report_.best_epoch == best
    acc = sum(p == y for p, y in zip(clf.predict(dev.texts), dev.labels)) / len(dev)
    assert acc == pytest.approx(hist[best]["dev_acc"])


class _Stop(Exception):
    pass


class _StopAfter(StepHook):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            raise _Stop


def _run(tiny_model, data, out_dir, hooks=(), resume=False):
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, data.label_names)
    settings = TrainSettings(epochs=3, lr=2e-3, batch_size=16, seed=0)
    report = train(model, tok, data, None, settings, hooks, out_dir, resume, progress=False)
    return model, tok, report


def test_resume_after_interruption_matches_uninterrupted(tiny_model, small, tmp_path):
    train_data, dev = small
    model_a, tok, rep_a = _run(tiny_model, train_data, tmp_path / "a")
    with pytest.raises(_Stop):  # killed during epoch 2: the checkpoint of epoch 1 is on disk
        _run(tiny_model, train_data, tmp_path / "b", hooks=(_StopAfter(2),))
    model_b, _, rep_b = _run(tiny_model, train_data, tmp_path / "b", resume=True)
    assert [h["loss"] for h in rep_b.history] == [h["loss"] for h in rep_a.history]
    # the report covers the whole run, the interrupted session's two epochs included
    assert 0 < rep_b.resumed_train_seconds < rep_b.train_seconds
    assert round(rep_b.samples_per_s * rep_b.train_seconds) == round(rep_a.samples_per_s * rep_a.train_seconds)
    s = TrainSettings()
    assert torch.equal(predict_logits(model_a, tok, dev.texts, s), predict_logits(model_b, tok, dev.texts, s))


class _PredictAtEpochEnd(StepHook):
    """Before each epoch's dev evaluation, pins every prediction to one class: class 0 after epoch 0, class 1
    after the later ones. On a dev set of class-0 samples epoch 0 is then the best (accuracy 1.0, then 0.0)."""

    def after_backward(self, ctx):
        if (ctx.step + 1) % ctx.steps_per_epoch == 0:
            with torch.no_grad():
                ctx.model.classifier.bias.copy_(torch.tensor([1e4, 0.0] if ctx.epoch == 0 else [0.0, 1e4]))
            ctx.model.classifier.bias.grad = None


def test_resume_with_dev_data_keeps_the_best_epoch_from_before_the_interruption(tiny_model, small, tmp_path):
    train_data, dev = small
    dev0 = dev.subset([i for i, y in enumerate(dev.labels) if y == 0])

    def run(out_dir, hooks=(), resume=False):
        torch.manual_seed(0)
        model = load_model(tiny_model, train_data.label_names)
        settings = TrainSettings(epochs=3, lr=2e-3, batch_size=16, seed=0)
        report = train(model, load_tokenizer(tiny_model), train_data, dev0, settings, (_PredictAtEpochEnd(), *hooks),
                       out_dir, resume, progress=False)
        return model, report

    model_a, rep_a = run(tmp_path / "a")
    assert rep_a.best_epoch == 0 and [h["dev_acc"] for h in rep_a.history] == [1.0, 0.0, 0.0]
    with pytest.raises(_Stop):  # killed during epoch 2: epoch 1's checkpoint, and epoch 0's best weights, on disk
        run(tmp_path / "b", hooks=(_StopAfter(2),))
    model_b, rep_b = run(tmp_path / "b", resume=True)
    assert rep_b.best_epoch == 0 and rep_b.history == rep_a.history
    tok, s = load_tokenizer(tiny_model), TrainSettings()
    assert torch.equal(predict_logits(model_a, tok, dev.texts, s), predict_logits(model_b, tok, dev.texts, s))
    assert (predict_logits(model_b, tok, dev.texts, s).argmax(-1) == 0).all()


def _kill_at_the_checkpoint_swap(tiny_model, train_data, work, monkeypatch) -> None:
    """Train into `work`, killed in the epoch-1 save after epoch 0's checkpoint was moved aside to `.old` and
    before the finished `.partial` took its place."""
    import os

    from cleantune import training

    real = os.replace

    def killed_at_the_swap(src, dst):
        if str(src).endswith("checkpoints.partial") and os.path.exists(str(dst) + ".old"):
            raise _Stop
        return real(src, dst)

    monkeypatch.setattr(training.os, "replace", killed_at_the_swap)
    with pytest.raises(_Stop):
        _run(tiny_model, train_data, work)
    monkeypatch.undo()


@pytest.mark.parametrize("left", ["new", "old"])
def test_resume_after_a_kill_between_the_checkpoint_renames(left, tiny_model, small, tmp_path, monkeypatch):
    """The epoch-1 save moved epoch 0's checkpoint aside and was killed before putting its own in place."""
    train_data, dev = small
    model_a, tok, rep_a = _run(tiny_model, train_data, tmp_path / "a")
    _kill_at_the_checkpoint_swap(tiny_model, train_data, tmp_path / "b", monkeypatch)
    if left == "old":  # killed before the new one was finished: only the old one is complete
        (tmp_path / "b" / "checkpoints.partial" / "state.json").unlink()
    assert not (tmp_path / "b" / "checkpoints").exists()
    model_b, _, rep_b = _run(tiny_model, train_data, tmp_path / "b", resume=True)
    assert rep_b.resumed_train_seconds > 0  # not started over
    assert [h["loss"] for h in rep_b.history] == [h["loss"] for h in rep_a.history]
    s = TrainSettings()
    assert torch.equal(predict_logits(model_a, tok, dev.texts, s), predict_logits(model_b, tok, dev.texts, s))


def test_checkpoints_and_saved_models_reach_the_disk_before_they_replace_the_earlier_ones(tiny_model, small, tmp_path,
                                                                                          monkeypatch):
    """A rename reaches the disk when the kernel gets to it, not after the data it renames: every file is synced
    before the marker or the rename that makes it current, and the renaming folder before the earlier copy is
    deleted. (What a power loss leaves cannot be tested here; the order of the calls can.)"""
    from cleantune import training
    from cleantune.models import Classifier

    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, training.shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    monkeypatch.setattr(training.shutil, "rmtree", lambda p, **kw: (events.append(("rmtree", str(p))),
                                                                    real_rmtree(p, **kw))[1])
    train_data, _ = small
    model, tok, _ = _run(tiny_model, train_data, tmp_path / "run")
    work = tmp_path / "run"
    marks = [i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("checkpoints.partial/state.json")]
    assert len(marks) == 3  # one checkpoint per epoch
    for k, mark in enumerate(marks):
        start = marks[k - 1] if k else 0
        synced = {e[1] for e in events[start:mark] if e[0] == "sync"}
        written = {"trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json.tmp"}
        assert {str(work / "checkpoints.partial" / f) for f in written} <= synced
        swap = next(i for i, e in enumerate(events[mark:], mark) if e[0] == "replace" and e[2] == str(work / "checkpoints"))
        assert ("sync", str(work)) in events[swap:]  # the folder holding the swap, synced before the old copy goes
        gone = next((i for i, e in enumerate(events[swap:], swap) if e == ("rmtree", str(work / "checkpoints.old"))), None)
        assert gone is None or ("sync", str(work)) in events[swap:gone]
    events.clear()
    out = tmp_path / "model"
    Classifier(model, tok, train_data.label_names, 64).save_pretrained(out)
    swap = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out))
    assert {str(out.with_name("model.partial") / "model.safetensors"), str(out.with_name("model.partial"))} <= \
        {e[1] for e in events[:swap] if e[0] == "sync"}
    assert ("sync", str(tmp_path)) in events[swap:]


def test_a_kill_while_clearing_the_resumed_partial_checkpoint_falls_back_to_the_old_one(tiny_model, small, tmp_path,
                                                                                      monkeypatch):
    """Resumed from `.partial` (a kill between the renames), the next save empties that folder first. Killed
    midway, what is left of it is no checkpoint: --resume takes the intact `.old` instead of refusing."""
    import shutil

    from cleantune import training

    train_data, dev = small
    model_a, tok, rep_a = _run(tiny_model, train_data, tmp_path / "a")
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def killed_at_the_swap(src, dst):
        if str(src).endswith("checkpoints.partial") and os.path.exists(str(dst) + ".old"):
            raise _Stop
        return real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", killed_at_the_swap)
    with pytest.raises(_Stop):  # at epoch 1's save: `.partial` holds epoch 1, `.old` epoch 0
        _run(tiny_model, train_data, tmp_path / "b")
    monkeypatch.undo()

    def killed_while_clearing(path, *args, **kwargs):
        if str(path).endswith("checkpoints.partial"):
            (path / "trainable.safetensors").unlink()  # rmtree removes files in the directory's order
            raise _Stop
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(training.shutil, "rmtree", killed_while_clearing)
    with pytest.raises(_Stop):  # resumed from `.partial`, trained epoch 2, killed clearing `.partial` to save it
        _run(tiny_model, train_data, tmp_path / "b", resume=True)
    monkeypatch.undo()
    model_b, _, rep_b = _run(tiny_model, train_data, tmp_path / "b", resume=True)
    assert [h["loss"] for h in rep_b.history] == [h["loss"] for h in rep_a.history]
    s = TrainSettings()
    assert torch.equal(predict_logits(model_a, tok, dev.texts, s), predict_logits(model_b, tok, dev.texts, s))


def test_resume_refuses_other_settings(tiny_model, small, tmp_path):
    from cleantune.errors import UserError

    train_data, _ = small
    _run(tiny_model, train_data, tmp_path / "c")
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, train_data.label_names)
    with pytest.raises(UserError, match="other settings"):
        train(model, tok, train_data, None, TrainSettings(epochs=3, lr=1e-3, batch_size=16), (), tmp_path / "c",
              resume=True, progress=False)


def test_resume_refuses_other_data_or_defense(tiny_model, small, tmp_path):
    from cleantune.errors import UserError

    train_data, dev = small
    _run(tiny_model, train_data, tmp_path / "d")
    tok = load_tokenizer(tiny_model)
    settings = TrainSettings(epochs=3, lr=2e-3, batch_size=16, seed=0)
    other = TextDataset(list(reversed(train_data.texts)), list(train_data.labels), train_data.label_names)
    relabelled = TextDataset(list(train_data.texts), [1 - y for y in train_data.labels], train_data.label_names)
    for data, dev_data, identity in [(other, None, None), (relabelled, None, None), (train_data, dev, None),
                                     (train_data, None, {"defense": "lora"})]:
        with pytest.raises(UserError, match="other settings, data or model weights"):  # same size, other content or defense
            train(load_model(tiny_model, train_data.label_names), tok, data, dev_data, settings, (), tmp_path / "d",
                  resume=True, progress=False, identity=identity)


def test_work_lock_is_exclusive_and_leaves_nothing(tmp_path):
    from cleantune.training import Busy, work_lock

    with work_lock(tmp_path / "w", wait=False):
        with pytest.raises(Busy, match="another cleantune process is training into"):
            with work_lock(tmp_path / "w", wait=False):
                pass
    assert list(tmp_path.iterdir()) == []
    with work_lock(tmp_path / "w", wait=False):  # free again
        pass


def test_a_checkpoint_resumes_only_under_its_own_precision(monkeypatch):
    from cleantune.training import _fingerprint

    args = (TrainSettings(), [[5, 6, 7]], [0], None, None, "train")
    full = _fingerprint(*args)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert _fingerprint(*args) != full  # so --resume says "other settings"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert _fingerprint(*args) == full


class _ZeroGrads(StepHook):
    def after_backward(self, ctx):
        for p in ctx.model.parameters():
            if p.grad is not None:
                p.grad.zero_()


def test_hook_rewrites_gradients_before_the_step(tiny_model, small):
    train_data, _ = small
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, train_data.label_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tok, train_data, None, TrainSettings(epochs=1, weight_decay=0.0), (_ZeroGrads(),), progress=False)
    assert all(torch.equal(before[n], p.cpu()) for n, p in model.named_parameters())  # trained on a GPU if any


def test_divergence_stops_and_keeps_the_best_finite_epoch(tiny_model, small):
    from cleantune.errors import UserError

    train_data, dev = small  # 160 samples, batch 32: 5 steps per epoch; step 7 is in epoch 1
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, train_data.label_names)
    settings = TrainSettings(epochs=3, lr=1e-3, seed=0)
    with pytest.warns(RuntimeWarning, match="diverged at step 7 .epoch 1.*kept epoch 0"):
        report = train(model, tok, train_data, dev, settings, (InfGradAt(7),), progress=False)
    assert [h["epoch"] for h in report.history] == [0, 1] and report.history[1]["diverged_at_step"] == 7
    assert report.best_epoch == 0 and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model = load_model(tiny_model, train_data.label_names)
    with pytest.raises(UserError, match="diverged at step 2 .epoch 0.*lower the learning rate"):
        train(model, tok, train_data, None, settings, (InfGradAt(2),), progress=False)


def test_cli_train_reports_a_divergence_and_saves_the_kept_epoch(tiny_model, tmp_path, capsys, monkeypatch):
    from cleantune.cli import main

    monkeypatch.setattr(FineTune, "hooks", lambda self, *a: [InfGradAt(7)])
    rows = ["sentence\tlabel"] + [f"a {'great' if i % 2 else 'awful'} film {i}\t{i % 2}" for i in range(160)]
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "d.tsv").write_text("\n".join(rows[:41]) + "\n")
    assert main(["train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "d.tsv"), "--out", str(tmp_path / "m"),
                 "--model", tiny_model, "--epochs", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "cleantune: warning: training diverged at step 7 (epoch 1)" in captured.err
    assert "epoch kept: 0" in captured.out and (tmp_path / "m" / "model.safetensors").is_file()


def test_non_positive_max_grad_norm_means_no_clipping(tiny_model, small):
    train_data, _ = small
    tok = load_tokenizer(tiny_model)
    weights = []
    for clip in (0.0, -1.0, 1e-4):
        torch.manual_seed(0)
        model = load_model(tiny_model, train_data.label_names)
        train(model, tok, train_data, None, TrainSettings(epochs=1, lr=1e-3, max_grad_norm=clip), progress=False)
        weights.append(model.classifier.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])  # a positive norm does clip


class _RecordLr(StepHook):
    def __init__(self):
        self.lrs = []

    def after_backward(self, ctx):  # the lr this step's optimizer.step() will use
        self.lrs.append(ctx.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("schedule,after", [("linear", (0.75, 0.5, 0.25)), ("constant", (1, 1, 1))])
def test_lr_warms_up_from_zero_then_decays_linearly_or_stays(tiny_model, small, schedule, after):
    """constant keeps a warmup given with it (it dropped it without a word)."""
    train_data, _ = small
    tok = load_tokenizer(tiny_model)
    rec = _RecordLr()
    # 64 samples, batch 8: 8 steps, of which warmup_ratio 0.5 makes the first 4 warmup
    train(load_model(tiny_model, train_data.label_names), tok, train_data.subset(range(64)), None,
          TrainSettings(epochs=1, batch_size=8, lr=1e-3, warmup_ratio=0.5, lr_schedule=schedule), (rec,),
          progress=False)
    assert rec.lrs == pytest.approx([1e-3 * f for f in (0, 0.25, 0.5, 0.75, 1, *after)])


@pytest.mark.parametrize("n,batch,ratio,steps,warmup", [
    (60, 8, 0.25, 16, 4),  # 8 steps an epoch (the last of 4 samples), 16 in 2 epochs; warmup 0.25 of 16 = 4
    (100, 4, 0.58, 50, 29),  # 25 steps an epoch, 50 in 2; 0.58 of 50 is 29 warmup steps (int(0.58 * 50) is 28)
    (60, 8, 0.3, 16, 4),  # 0.3 of 16 is 4.8: rounded down to 4 warmup steps, not up to 5
])
def test_lr_schedule_spans_every_epoch_counts_a_short_last_batch_and_takes_the_ratio_as_written(
        tiny_model, small, n, batch, ratio, steps, warmup):
    train_data, _ = small
    rec = _RecordLr()
    train(load_model(tiny_model, train_data.label_names), load_tokenizer(tiny_model), train_data.subset(range(n)),
          None, TrainSettings(epochs=2, batch_size=batch, lr=1e-3, warmup_ratio=ratio), (rec,), progress=False)
    assert rec.lrs == pytest.approx([1e-3 * (s / warmup if s < warmup else (steps - s) / (steps - warmup))
                                     for s in range(steps)])


def test_batch_order_depends_on_the_seed():
    # runs of different seeds differ in their data order too, not only in their initialisation
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    for group in (True, False):
        a, b = (batch_order(lengths, 8, seed=s, epoch=0, group_by_length=group) for s in (0, 1))
        assert a != b and sorted(i for x in a for i in x) == sorted(i for x in b for i in x)


def test_make_batch_never_cuts_a_sample_shorter_than_its_width():
    # pad_to_length below a batch's longest sample (below max_length, say) pads to that sample instead
    from cleantune.training import make_batch

    batch = make_batch([[5, 6, 7], [8]], pad_id=0, width=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert make_batch([[5], [8]], pad_id=0, width=3)["input_ids"].tolist() == [[5, 0, 0], [8, 0, 0]]


def test_batches_group_lengths_only_inside_their_mega_batch_and_change_every_epoch():
    lengths = list(range(2000))  # batch 4: mega-batches of 200 samples
    a, b = (batch_order(lengths, 4, seed=0, epoch=e, group_by_length=True) for e in (0, 1))
    assert {frozenset(x) for x in a} != {frozenset(x) for x in b}
    # sorted inside 200 random samples, not over all 2,000: neighbours in a batch are about 10 lengths apart
    assert sum(max(x) - min(x) > 3 for x in a) > 0.9 * len(a)


def test_biases_and_layer_norms_take_no_weight_decay(tiny_model):
    from cleantune.training import _param_groups

    model = load_model(tiny_model, ["neg", "pos"])
    decay, no_decay = _param_groups(model, 0.3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters()
                                                           if n.endswith("bias") or "LayerNorm" in n}
    assert all(p.ndim == 2 for p in decay["params"]) and decay["params"]


def test_training_pads_every_batch_to_pad_to_length(tiny_model, small, monkeypatch):
    import cleantune.training as training

    train_data, _ = small
    widths, make_batch = [], training.make_batch

    def spy(ids, pad_id, pad_to=None):
        batch = make_batch(ids, pad_id, pad_to)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(training, "make_batch", spy)
    train(load_model(tiny_model, train_data.label_names), load_tokenizer(tiny_model), train_data.subset(range(32)),
          None, TrainSettings(epochs=1, batch_size=8, max_length=32, pad_to_length=48), progress=False)
    assert widths == [48] * 4


def test_tokens_per_s_counts_real_tokens_not_padding(tiny_model, small):
    train_data, _ = small
    data = train_data.subset(range(64))
    tok = load_tokenizer(tiny_model)
    # every batch padded to 64 columns, far past any sample's 32 tokens: padding would inflate the count
    report = train(load_model(tiny_model, data.label_names), tok, data, None,
                   TrainSettings(epochs=1, batch_size=16, max_length=32, pad_to_length=64), progress=False)
    real = sum(len(x) for x in encode(tok, data.texts, 32))
    assert real < 64 * 64
    assert report.tokens_per_s * report.train_seconds == pytest.approx(real, rel=1e-9)


def test_a_defense_never_sees_the_poison_flags(tiny_model, small, monkeypatch):
    import cleantune.defenses.base as base

    train_data, _ = small
    flagged = TextDataset(list(train_data.texts), list(train_data.labels), train_data.label_names,
                          [i % 3 == 0 for i in range(len(train_data))])
    seen = []

    def capture(model, tokenizer, data, *args, **kwargs):
        seen.append(data)
        raise _Stop  # what training receives is all this test needs

    monkeypatch.setattr(base, "train", capture)
    with pytest.raises(_Stop):
        FineTune(model=tiny_model, epochs=1).fit(flagged, progress=False)
    assert seen[0].texts == flagged.texts and seen[0].labels == flagged.labels
    assert not any(seen[0].poisoned) and sum(flagged.poisoned) == 54


def test_lora_trains_adapter_only(tiny_model, small):
    train_data, dev = small
    base = load_model(tiny_model, train_data.label_names)
    clf = LoRA(model=tiny_model, epochs=1, lr=1e-2, train_head=False).fit(train_data, dev, progress=False)
    merged = clf.model.merge_and_unload()
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p.cpu(), base.state_dict()[n])]
    assert changed and all(("query" in n or "value" in n) and n.endswith("weight") for n in changed)


def test_tokens_are_truncated_to_max_length(tiny_model):
    tok = load_tokenizer(tiny_model)
    ids = encode(tok, ["word " * 500], 32)
    assert len(ids[0]) == 32


class _Snapshot(StepHook):
    """The trainable weights at the end of `epoch` (after the other hooks, as a checkpoint has them)."""

    def __init__(self, epoch):
        self.epoch, self.weights = epoch, None

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            self.weights = {n: p.detach().cpu().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}


def test_divergence_without_dev_keeps_the_last_finished_epoch(tiny_model, small):
    train_data, _ = small  # 160 samples, batch 32: 5 steps per epoch; step 12 is in epoch 2
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, train_data.label_names)
    snap = _Snapshot(1)
    with pytest.warns(RuntimeWarning, match=r"diverged at step 12 \(epoch 2\).*kept epoch 1, the last finished one"):
        report = train(model, tok, train_data, None, TrainSettings(epochs=3, lr=1e-3, seed=0),
                       (snap, InfGradAt(12)), progress=False)
    assert [h["epoch"] for h in report.history] == [0, 1, 2] and report.history[2]["diverged_at_step"] == 12
    assert all(torch.equal(p.detach().cpu(), snap.weights[n]) for n, p in model.named_parameters())


def test_divergence_after_resume_without_dev_keeps_the_checkpointed_epoch(tiny_model, small, tmp_path):
    from safetensors.torch import load_file

    train_data, _ = small
    with pytest.raises(_Stop):  # killed during epoch 1: the checkpoint of epoch 0 is on disk
        _run(tiny_model, train_data, tmp_path / "r", hooks=(_StopAfter(1),))
    saved = load_file(tmp_path / "r" / "checkpoints" / "trainable.safetensors")
    with pytest.warns(RuntimeWarning, match=r"diverged at step 12 \(epoch 1\).*kept epoch 0"):  # 10 steps an epoch
        model, _, _ = _run(tiny_model, train_data, tmp_path / "r", hooks=(InfGradAt(12),), resume=True)
    assert all(torch.equal(p.detach().cpu(), saved[n]) for n, p in model.named_parameters())


def test_an_epoch_with_infinite_weights_is_not_kept(tiny_model, small):
    from cleantune.training import Diverged

    train_data, dev = small
    tok = load_tokenizer(tiny_model)
    for dev_data in (None, dev):
        model = load_model(tiny_model, train_data.label_names)
        with pytest.raises(Diverged, match=r"diverged at step 5 \(epoch 1\).*lower the learning rate"):
            # step 4 ends epoch 0 (5 steps an epoch), which is kept unless its weights are not finite
            train(model, tok, train_data, dev_data, TrainSettings(epochs=3, lr=1e-3), (InfWeightsAt(4),),
                  progress=False)


@pytest.mark.parametrize("setting,fragment", [
    ({"lr": 1e38}, "--lr must be a finite number of at most 1e+37, got 1e+38"),
    ({"lr": 1e300}, "--lr must be a finite number"),
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"lr": float("nan")}, "--lr must be positive"),
    ({"lr": 0.0}, "--lr must be positive, got 0.0"),  # an lr of 0 trains nothing, epochs long
    ({"weight_decay": -0.1}, "option weight_decay must be a finite number >= 0, got -0.1"),
    ({"weight_decay": 1e39}, "option weight_decay must be a finite number"),
    ({"weight_decay": float("nan")}, "option weight_decay must be a finite number"),
    ({"warmup_ratio": float("inf")}, "option warmup_ratio must be in [0, 1)"),
    ({"warmup_ratio": 1.0}, "option warmup_ratio must be in [0, 1)"),  # a run that only warms up
    ({"max_grad_norm": float("nan")}, "option max_grad_norm must be a number"),
])
def test_float_settings_outside_what_float32_training_takes_are_refused(setting, fragment):
    from cleantune.errors import UserError

    with pytest.raises(UserError) as e:
        TrainSettings(**setting)
    assert fragment in str(e.value)


def test_the_largest_accepted_lr_trains_without_an_overflow(tiny_model, small):
    """AdamW's first step divides lr by 1 - beta1 in float32: the bound leaves room for it (the model then
    diverges, which the loop reports in one line)."""
    from cleantune.errors import UserError
    from cleantune.training import LR_MAX

    train_data, _ = small
    tok = load_tokenizer(tiny_model)
    TrainSettings(lr=LR_MAX, max_grad_norm=float("inf"), weight_decay=0.0)  # inf and <= 0: no clipping
    with pytest.raises(UserError, match="diverged"):
        train(load_model(tiny_model, train_data.label_names), tok, train_data, None,
              TrainSettings(epochs=2, lr=LR_MAX, warmup_ratio=0.0), progress=False)


def test_sync_folder_skips_a_filesystem_that_cannot_sync_and_raises_a_failed_write_back(tmp_path, monkeypatch):
    """Some network and FUSE filesystems answer fsync with EINVAL: saving a checkpoint there must not fail. An EIO
    means the data did not reach the disk, and the caller must not rename it in as if it had."""
    import errno

    from cleantune.training import sync_folder

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x")
    for code in (errno.EINVAL, errno.ENOTSUP):
        monkeypatch.setattr(os, "fsync", lambda fd, code=code: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        sync_folder(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))))
    with pytest.raises(OSError) as e:
        sync_folder(tmp_path)
    assert e.value.errno == errno.EIO


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error_and_keeps_the_previous_one(tiny_model, small,
                                                                                            tmp_path, monkeypatch):
    """A full disk while the second epoch's checkpoint is written: an OSError traceback before. The first epoch's
    checkpoint stays whole, so --resume continues from it."""
    import errno

    from cleantune import training
    from cleantune.errors import UserError

    train_data, _ = small
    real, calls = training._fsync, []

    def full_on_the_second_save(path):
        if path.name == "state.json.tmp":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path)

    monkeypatch.setattr(training, "_fsync", full_on_the_second_save)
    with pytest.raises(UserError, match="cannot write epoch 1's checkpoint .*No space left on device.*--resume"):
        _run(tiny_model, train_data, tmp_path / "b")
    monkeypatch.undo()
    # the cut `.partial` (a model's worth of weights) is removed, not left to keep the disk full
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoints"]
    assert (tmp_path / "b" / "checkpoints" / "state.json").is_file()
    _, _, rep_b = _run(tiny_model, train_data, tmp_path / "b", resume=True)
    _, _, rep_a = _run(tiny_model, train_data, tmp_path / "a")
    assert rep_b.resumed_train_seconds > 0
    assert [h["loss"] for h in rep_b.history] == [h["loss"] for h in rep_a.history]


class _RecordMode(StepHook):
    def __init__(self):
        self.modes, self.losses = [], []

    def after_backward(self, ctx):
        self.modes.append(ctx.model.training)
        self.losses.append(float(ctx.loss))


def test_training_steps_run_in_train_mode_and_the_model_is_returned_in_eval_mode(tiny_model, small):
    # dropout is part of fine-tuning (from_pretrained hands the model over in eval mode, and each dev evaluation
    # switches to it); what train returns predicts deterministically when called directly
    train_data, dev = small
    rec = _RecordMode()
    model = load_model(tiny_model, train_data.label_names)
    assert not model.training
    train(model, load_tokenizer(tiny_model), train_data.subset(range(64)), dev.subset(range(16)),
          TrainSettings(epochs=2, batch_size=16, lr=1e-3), (rec,), progress=False)
    assert rec.modes == [True] * 8
    assert not model.training and not any(m.training for m in model.modules())


def test_an_epochs_loss_is_the_mean_of_its_steps_losses(tiny_model, small):
    train_data, _ = small
    rec = _RecordMode()
    # 40 samples, batch 16: steps of 16, 16 and 8 samples, 3 an epoch
    report = train(load_model(tiny_model, train_data.label_names), load_tokenizer(tiny_model),
                   train_data.subset(range(40)), None, TrainSettings(epochs=2, batch_size=16, lr=1e-3), (rec,),
                   progress=False)
    assert [h["steps"] for h in report.history] == [3, 3]
    for e, h in enumerate(report.history):
        assert h["loss"] == pytest.approx(sum(rec.losses[3 * e: 3 * e + 3]) / 3)


def test_samples_per_s_counts_a_short_last_batch_as_what_it_holds(tiny_model, small):
    train_data, _ = small
    # 40 samples, batch 16, 2 epochs: 80 samples trained on, not 6 full batches of 96
    report = train(load_model(tiny_model, train_data.label_names), load_tokenizer(tiny_model),
                   train_data.subset(range(40)), None, TrainSettings(epochs=2, batch_size=16, lr=1e-3), progress=False)
    assert report.samples_per_s * report.train_seconds == pytest.approx(2 * 40, rel=1e-9)


def test_weight_decay_reaches_the_optimizer_for_weight_matrices_only(tiny_model, small):
    # with every gradient zeroed AdamW's update is only its decoupled decay, p *= 1 - lr * weight_decay a step:
    # weight matrices shrink by that factor per step, biases and LayerNorms not at all
    train_data, _ = small
    lr, wd, steps = 1e-2, 0.5, 4  # 64 samples, batch 16: 4 steps; constant lr without warmup
    model = load_model(tiny_model, train_data.label_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, load_tokenizer(tiny_model), train_data.subset(range(64)), None,
          TrainSettings(epochs=1, batch_size=16, lr=lr, weight_decay=wd, warmup_ratio=0.0, lr_schedule="constant"),
          (_ZeroGrads(),), progress=False)
    factor = (1 - lr * wd) ** steps
    for n, p in model.named_parameters():
        expected = before[n] if n.endswith("bias") or "LayerNorm" in n else before[n] * factor
        assert torch.allclose(p.detach().cpu(), expected, rtol=1e-5, atol=0), n


class _PinPredictions(StepHook):
    """Pins every prediction to class 1 at each epoch's end (before the dev evaluation)."""

    def after_backward(self, ctx):
        if (ctx.step + 1) % ctx.steps_per_epoch == 0:
            with torch.no_grad():
                ctx.model.classifier.bias.copy_(torch.tensor([0.0, 1e4]))
            ctx.model.classifier.bias.grad = None


def test_an_epoch_with_zero_dev_accuracy_is_still_selected(tiny_model, small):
    # a dev accuracy of 0.0 is a score like any other: with every epoch at 0.0 the earliest is kept (ties keep
    # the earlier), not the last epoch with no best_epoch at all
    train_data, dev = small
    dev0 = dev.subset([i for i, y in enumerate(dev.labels) if y == 0])
    snap = _Snapshot(0)
    model = load_model(tiny_model, train_data.label_names)
    report = train(model, load_tokenizer(tiny_model), train_data.subset(range(64)), dev0,
                   TrainSettings(epochs=2, batch_size=16, lr=1e-3), (_PinPredictions(), snap), progress=False)
    assert [h["dev_acc"] for h in report.history] == [0.0, 0.0]
    assert report.best_epoch == 0
    assert all(torch.equal(p.detach().cpu(), snap.weights[n]) for n, p in model.named_parameters())


def test_an_empty_dev_set_selects_nothing_and_a_divergence_keeps_the_last_epoch(tiny_model, small):
    # an empty dev set is no dev set: no dev_acc of NaN in the history, and a divergence falls back to the last
    # finished epoch instead of failing for want of a best one
    train_data, _ = small
    empty = TextDataset([], [], train_data.label_names)
    model = load_model(tiny_model, train_data.label_names)
    with pytest.warns(RuntimeWarning, match="diverged at step 5 .epoch 1.*kept epoch 0"):
        report = train(model, load_tokenizer(tiny_model), train_data.subset(range(64)), empty,
                       TrainSettings(epochs=2, batch_size=16, lr=1e-3), (InfGradAt(5),), progress=False)
    assert report.best_epoch is None and "dev_acc" not in report.history[0]


def test_a_checkpoint_resumes_only_with_its_own_dev_texts():
    # model selection depends on the dev texts: a dev set of other texts with the same labels is other data
    from cleantune.training import _fingerprint

    dev_a = TextDataset(["a fine film", "a dull film"], [1, 0], ["neg", "pos"])
    dev_b = TextDataset(["a great film", "an awful film"], [1, 0], ["neg", "pos"])
    args = (TrainSettings(), [[5, 6, 7]], [0])
    assert _fingerprint(*args, dev_a, None, "train") != _fingerprint(*args, dev_b, None, "train")
    assert _fingerprint(*args, dev_a, None, "train") == _fingerprint(*args, dev_a, None, "train")


def test_has_checkpoint_needs_a_finished_state_file(tmp_path):
    # `--resume` says "no checkpoint ... training from the start" unless a save finished: an empty work folder
    # or a half-written `.partial` (killed during the first save) holds nothing to resume
    from cleantune.training import has_checkpoint

    work = tmp_path / "m.work"
    assert not has_checkpoint(work)
    work.mkdir()
    assert not has_checkpoint(work)
    (work / "checkpoints.partial").mkdir()
    (work / "checkpoints.partial" / "trainable.safetensors").write_bytes(b"cut")
    assert not has_checkpoint(work)
    (work / "checkpoints.old").mkdir()
    (work / "checkpoints.old" / "state.json").write_text("{}")  # a kill between the renames: resumable
    assert has_checkpoint(work)


def test_work_lock_removes_the_work_folder_it_made_when_training_fails_before_a_checkpoint(tmp_path):
    # a run that fails in its first epoch leaves no empty `<out>.work` (nor its parents) behind
    from cleantune.training import work_lock

    work = tmp_path / "a" / "m.work"
    with pytest.raises(RuntimeError):
        with work_lock(work, wait=False):
            work.mkdir()  # what train does before its first save
            raise RuntimeError("failed in epoch 0")
    assert list(tmp_path.iterdir()) == []


class _EpochsRun(StepHook):
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, ctx):
        self.epochs.append(ctx.epoch)


def test_a_kill_between_the_renames_resumes_from_the_finished_new_checkpoint(tiny_model, small, tmp_path,
                                                                              monkeypatch):
    # the finished `.partial` (epoch 1) is newer than `.old` (epoch 0): resuming from `.old` would redo epoch 1
    train_data, _ = small
    _kill_at_the_checkpoint_swap(tiny_model, train_data, tmp_path / "b", monkeypatch)
    seen = _EpochsRun()
    _run(tiny_model, train_data, tmp_path / "b", hooks=(seen,), resume=True)
    assert seen.epochs == [2]  # of 3 epochs, 0 and 1 were saved: only the last one is trained again


def test_swap_in_replaces_a_leftover_old_folder(tmp_path):
    # a kill after the new folder was put in place but before `<dest>.old` was deleted leaves both: the next
    # swap must still go through (os.replace onto a non-empty folder fails), or every later save would fail
    from cleantune.training import swap_in

    dest, old, tmp = tmp_path / "ck", tmp_path / "ck.old", tmp_path / "ck.partial"
    for folder, text in ((dest, "current"), (old, "leftover"), (tmp, "new")):
        folder.mkdir()
        (folder / "state.json").write_text(text)
    swap_in(tmp, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (dest / "state.json").read_text() == "new"


def test_sync_folder_flushes_the_files_of_subfolders(tmp_path, monkeypatch):
    # a saved model's adapter sits in a subfolder: its files must reach the disk before the folder is swapped in
    from cleantune import training

    synced = []
    monkeypatch.setattr(training, "_fsync", synced.append)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights.safetensors").write_bytes(b"w")
    (tmp_path / "config.json").write_text("{}")
    training.sync_folder(tmp_path)
    assert set(synced) == {tmp_path, tmp_path / "config.json", tmp_path / "adapter",
                           tmp_path / "adapter" / "weights.safetensors"}


@pytest.mark.parametrize("edit,fragment", [
    ({"epoch": True}, "state.json: epoch true is not one of 0..2"),  # JSON true would resume as epoch 1
    ({"best_score": "0.9"}, "state.json: history, best_epoch, best_score or done is not what cleantune writes"),
])
def test_read_checkpoint_refuses_a_state_of_the_wrong_types_before_reading_the_weights(tmp_path, edit, fragment):
    # checked in state.json itself, not left to fail later (a comparison of a text score mid-training)
    import json

    from cleantune.errors import UserError
    from cleantune.training import _read_checkpoint

    state = {"fingerprint": "f", "epoch": 1, "history": [{}], "best_epoch": None, "best_score": 0.5, **edit}
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError) as e:
        _read_checkpoint(tmp_path, "f", 3)
    assert f"is damaged ({fragment}" in str(e.value)
