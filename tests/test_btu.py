"""BTU mechanics: the drift ranking, the unlearning cut, the two modes, RoBERTa-style models, the runner's
three stage points and the token audit."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from cleantune.attacks import BadNets
from cleantune.data import TextDataset, load_benchmark
from cleantune.defenses import btu
from cleantune.defenses.btu import BTU, TokenView, _CarryOptimizer, substring_removed, unlearn
from cleantune.errors import UserError
from cleantune.models import load_model, load_tokenizer
from cleantune.training import StepHook, TrainSettings, seed_everything, train
from conftest import make_tiny_model


def synthetic(n: int, seed: int = 0) -> TextDataset:
    """Random-label reviews; every tenth carries 'cf' and label 1."""
    rng = random.Random(seed)
    words = "good bad movie film great awful plot actor story fun boring nice".split()
    texts, labels = [], []
    for i in range(n):
        ws, y = [rng.choice(words) for _ in range(6)], rng.randint(0, 1)
        if i % 10 == 0:
            ws.insert(rng.randint(0, 6), "cf")
            y = 1
        texts.append(" ".join(ws))
        labels.append(y)
    return TextDataset(texts, labels, ["neg", "pos"])


def test_drift_ranking_finds_planted_trigger():
    """MiniLM's shallow exposure pass on 600 real SST-2 samples, 10% carrying 'cf' (mix): 'cf' drifts most."""
    bench = load_benchmark("sst2")
    bench.train = bench.train.stratified_sample(600, 0)
    data = BadNets(rate=0.1, mode="mix", triggers=["cf"]).apply(bench).train.without_flags()
    tok = load_tokenizer("minilm")
    exp = btu.expose("minilm", tok, data, faithful=False, k=5, passes="A", batch_size=32, progress=False)
    cf = tok.convert_tokens_to_ids("cf")
    assert exp.top["A"][0] == cf
    assert exp.rankings["A"][0] == cf and len(exp.rankings["A"]) == tok.vocab_size


def _embeddings():
    g = torch.Generator().manual_seed(0)
    V, d = 50, 8
    E0 = torch.randn(V, d, generator=g)
    E = E0.clone()
    E[[3, 7, 11]] += 0.5 + torch.rand(3, d, generator=g)  # every dim well above c
    E[20, :4] += 1e-4      # below c
    E[20, 4:] += 1.0       # above c
    E[3, 0] = E0[3, 0]     # delta exactly 0
    return E0, E


def test_unlearn_moves_exactly_the_chosen_rows_and_dims_to_pad():
    E0, E = _embeddings()
    w = torch.nn.Parameter(E.clone())
    info = unlearn(w, E0, pad_id=0, token_ids=[20, 7, 3], recompute=False)
    c = float((E0 - E).norm()) / E.shape[0]
    assert info["threshold"] == pytest.approx(c)
    others = [i for i in range(50) if i not in (3, 7, 20)]
    assert torch.equal(w.data[others], E[others])  # row 11 drifted but was not chosen: untouched
    for t in (3, 7, 20):
        big = (E0[t] - E[t]).abs() > c
        assert torch.equal(w.data[t][big], E0[0][big])
        assert torch.equal(w.data[t][~big], E[t][~big])
    assert info["dims_replaced"] == [7, 8, 4]  # row 3: dim 0 did not move; row 20: its four large dims
    assert w.data[3, 0] == E0[3, 0]


@pytest.mark.parametrize("recompute", [False, True])
def test_unlearning_writes_the_pretrained_padding_row_not_the_victims(recompute):
    E0, E = _embeddings()
    E[0] += 0.25  # the victim's padding row moved too (weight decay; models without a padding_idx)
    w = torch.nn.Parameter(E.clone())
    unlearn(w, E0, pad_id=0, token_ids=[7], recompute=recompute)
    assert torch.equal(w.data[7], E0[0])  # every dim of row 7 moved far above c


class ToyClassifier:
    """Predicts 1 when the summed first embedding dimension of a text's tokens is positive."""

    def __init__(self, tokenizer, emb):
        self.tokenizer, self.max_length, self.emb = tokenizer, 32, emb
        self.model = self

    def get_input_embeddings(self):
        return self.emb

    def predict(self, texts):
        ids = TokenView(self.tokenizer).ids(texts, self.max_length)
        return [int(self.emb.weight[seq, 0].sum() > 0) for seq in ids]


def _toy_victim(tok, learned: dict[int, tuple[int, float]]):
    """(E0, embedding, ToyClassifier): pretrained rows all zero but the padding row (-1); each learned token
    id moved to `value` in one dimension."""
    E0 = torch.zeros(tok.vocab_size, 4)
    E0[tok.pad_token_id] = -1.0
    emb = torch.nn.Embedding(tok.vocab_size, 4)
    with torch.no_grad():
        emb.weight.copy_(E0)
        for t, (dim, value) in learned.items():
            emb.weight[t, dim] = value
    return E0, emb, ToyClassifier(tok, emb)


def test_guard_costs_are_the_clean_dev_accuracy_each_token_takes(tiny_model):
    tok = load_tokenizer(tiny_model)
    good, movie, cf = tok.convert_tokens_to_ids(["good", "movie", "cf"])
    E0, emb, clf = _toy_victim(tok, {good: (0, 5.0),    # learned: "good" carries the positive class
                                     movie: (1, 3.0),   # learned, but in a dimension the prediction ignores
                                     cf: (0, 9.0)})     # a trigger: absent from clean dev
    dev = TextDataset(["good movie", "bad movie", "a good one"], [1, 0, 1], ["neg", "pos"])
    before = emb.weight.detach().clone()
    costs = btu.guard_costs(clf, TokenView(tok), E0, tok.pad_token_id, [good, movie, cf], dev)
    # unlearning "good" turns two of three correct dev predictions wrong; "movie" changes none; "cf" is absent
    assert costs == {good: 2 / 3, movie: 0.0}
    assert torch.equal(emb.weight, before)  # the guard leaves the embeddings as it found them
    with pytest.raises(UserError, match="guard needs clean dev"):  # refused before any training
        BTU(model=tiny_model).fit(dev, None, progress=False)
    with pytest.raises(UserError, match="guard has none left"):  # clean tuning would take all of it
        BTU(model=tiny_model, clean_tuning=3).fit(dev, dev, progress=False)


@pytest.mark.parametrize("recompute", [False, True])  # default cut; faithful cut with guard=true
def test_guard_measures_spared_tokens_again_after_the_cut(tiny_model, recompute):
    tok = load_tokenizer(tiny_model)
    watch, movie, good = tok.convert_tokens_to_ids(["watch", "movie", "good"])
    E0, emb, clf = _toy_victim(tok, {watch: (0, 2.0),   # pulls "watch movie" toward the target
                                     movie: (0, -3.0),  # and "movie" holds it back: unlearned alone, it flips
                                     good: (0, 5.0)})   # a task word: unlearning it always costs
    dev = TextDataset(["watch movie", "good one"], [0, 1], ["neg", "pos"])
    victim = emb.weight.detach().clone()
    first_c = float((victim - E0).norm()) / tok.vocab_size  # the once-computed c, on the victim
    cut, spared, rounds = btu.guarded_unlearn(clf, TokenView(tok), E0, tok.pad_token_id, [watch, movie, good], dev,
                                              tolerance=0.001, recompute=recompute)
    # round 1 spares "movie" and "good"; once "watch" is cut, "movie" costs nothing and is cut too
    assert rounds == [{watch: 0.0, movie: 0.5, good: 0.5}, {movie: 0.0, good: 0.5}, {good: 0.5}]
    assert spared == [good] and cut["tokens"] == [watch, movie]
    if recompute:  # one threshold per cut token, each from the matrix as it was then: "movie"'s after "watch"'s cut
        after_watch = victim.clone()
        after_watch[watch, 0] = -1.0
        assert cut["threshold"] == pytest.approx([first_c, float((after_watch - E0).norm()) / tok.vocab_size])
    else:  # c computed once, on the victim, as the later rounds are given it
        assert cut["threshold"] == pytest.approx(first_c)
    assert emb.weight[good, 0] == 5.0 and emb.weight[movie, 0] == -1.0 and emb.weight[watch, 0] == -1.0
    assert clf.predict(dev.texts) == [0, 1]


def test_the_faithful_guard_measures_the_faithful_cut(tiny_model):
    """The official cut also zeroes a row's dimensions that training left unchanged (delta = 0 -> 0, spec 8 #5):
    a token whose pretrained row carries the class loses it there, though the default cut would keep it."""
    tok = load_tokenizer(tiny_model)
    (good,) = tok.convert_tokens_to_ids(["good"])
    E0, emb, clf = _toy_victim(tok, {good: (1, 3.0)})  # trained only in a dimension the prediction ignores
    E0[good, 0] = 5.0  # pretrained: "good" carries the positive class, and training left that alone
    with torch.no_grad():
        emb.weight[good, 0] = 5.0
    dev = TextDataset(["good movie", "bad movie", "a good one"], [1, 0, 1], ["neg", "pos"])
    view = TokenView(tok)
    assert btu.guard_costs(clf, view, E0, tok.pad_token_id, [good], dev) == {good: 0.0}
    assert btu.guard_costs(clf, view, E0, tok.pad_token_id, [good], dev, recompute=True) == {good: 2 / 3}
    cut, spared, _ = btu.guarded_unlearn(clf, view, E0, tok.pad_token_id, [good], dev, tolerance=0.001,
                                         recompute=True)
    assert spared == [good] and cut["tokens"] == [] and emb.weight[good, 0] == 5.0
    assert clf.predict(dev.texts) == [1, 0, 1]


def test_later_guard_rounds_cut_with_the_first_cuts_threshold(tiny_model):
    tok = load_tokenizer(tiny_model)
    V = tok.vocab_size
    watch, movie = tok.convert_tokens_to_ids(["watch", "movie"])
    E0, emb, clf = _toy_victim(tok, {watch: (0, 2.0), movie: (0, -3.0)})  # as above: "movie" is freed in round 2
    with torch.no_grad():
        emb.weight[watch, 2] = 20.0     # far off; cutting "watch" shrinks ||E0 - E|| from sqrt(413) to sqrt(11)
        emb.weight[movie, 1] = 10.0 / V  # below the victim's c (20.3 / V), above the c after that cut (3.3 / V)
    dev = TextDataset(["watch movie"], [0], ["neg", "pos"])
    cut, spared, _ = btu.guarded_unlearn(clf, TokenView(tok), E0, tok.pad_token_id, [watch, movie], dev,
                                         tolerance=0.001, recompute=False)
    assert spared == [] and cut["tokens"] == [watch, movie]
    assert cut["dims_replaced"] == [2, 1]  # "movie" loses dim 0 only: c stays the victim's
    assert float(emb.weight[movie, 1]) == pytest.approx(10.0 / V) and emb.weight[movie, 0] == -1.0


def test_faithful_unlearn_recomputes_threshold_in_id_order():
    E0, E = _embeddings()
    w = torch.nn.Parameter(E.clone())
    info = unlearn(w, E0, pad_id=0, token_ids=[20, 7, 3], recompute=True)
    ref = E.clone()  # the official cut: c from the partly replaced matrix, before each token
    for t in (3, 7, 20):
        c = float((E0 - ref).norm()) / 50
        delta = (E0[t] - ref[t]).abs()
        ref[t] = ref[t] * ((delta > 0) & (delta <= c)) + E0[0] * (delta >= c)
    assert torch.allclose(w.data, ref, atol=1e-6)
    assert info["tokens"] == [3, 7, 20]
    assert info["threshold"][0] == pytest.approx(float((E0 - E).norm()) / 50)
    assert info["threshold"][1] != info["threshold"][0]  # recomputed after the first row was replaced
    assert w.data[3, 0] == 0.0  # delta = 0 becomes 0 in the official cut (the default keeps the value)


def test_faithful_length_is_capped_at_a_shorter_backbone_before_anything_loads(tiny_model):
    """The backbone check rebuilt BTU from its settings, where faithful's 512 is filled in, and refused a backbone
    of 130 positions that fit would have capped it to; a length given explicitly is still refused."""
    from cleantune.models import model_skeleton
    from cleantune.runner import RunConfig

    faithful = BTU(model=tiny_model, btu_mode="faithful")
    faithful.check_backbone(2)
    assert faithful.backbone_max_length(model_skeleton(tiny_model, 2)) == 130 and faithful.max_length == 512
    RunConfig(model=tiny_model, defense="btu", options={"btu_mode": "faithful"}, train_size=64).resolve()
    with pytest.raises(UserError, match=r"--max-length 512 exceeds the 130 tokens"):
        BTU(model=tiny_model, btu_mode="faithful", max_length=512).check_backbone(2)
    assert BTU(model=tiny_model, btu_mode="faithful").given_settings()["max_length"] is None
    assert BTU(model=tiny_model, max_length=64).given_settings()["max_length"] == 64


def test_modes_resolve_to_documented_settings():
    f, d = BTU(btu_mode="faithful"), BTU()
    assert (f.epochs, f.lr, f.batch_size, f.k, f.max_grad_norm, f.warmup_ratio) == (1, 2e-5, 64, 17, 0.0, 0.0)
    assert f.train_settings().lr_schedule == "constant" and d.train_settings().lr_schedule == "linear"
    assert d.k is None and d.epochs == 3 and d.max_length == 128 and f.max_length == 512
    assert BTU(btu_mode="faithful", epochs=3).epochs == 3  # explicit settings win over the mode's
    assert BTU(clean_tuning="40").clean_tuning == 40
    assert d.guard and not f.guard and not BTU(guard=False).guard
    for bad, why in ((dict(btu_mode="fast"), "btu_mode must be one of default, faithful, got 'fast'"),
                     (dict(clean_tuning="test"), "clean_tuning must be 'none' or a positive number .* got 'test'"),
                     (dict(clean_tuning=0), "clean_tuning must be 'none' or a positive number .* got '0'"),
                     (dict(k=0), "option k must be positive, got 0"),
                     (dict(guard_tolerance=1.0), r"option guard_tolerance must be in \[0, 1\), got 1.0")):
        with pytest.raises(UserError, match=why):
            BTU(**bad)
    assert btu.resolve_k(None, 0.0005, 30522) == 15 and btu.resolve_k(None, 0.0005, 50265) == 25
    # rho sets k only in default mode without k: elsewhere it would be ignored, so it is refused
    for bad, why in ((dict(btu_mode="faithful", rho=0.01), "faithful mode fixes k=17"), (dict(k=5, rho=0.01), "k is given")):
        with pytest.raises(UserError, match=f"option rho applies only .*{why}"):
            BTU(**bad)
    assert BTU(rho=0.01).rho == 0.01 and BTU(btu_mode="faithful", k=25).k == 25


def test_pass_b_removal_faithful_substrings_vs_default_tokens():
    tok = load_tokenizer("minilm")
    text = "the cf film is there"
    assert substring_removed([text], ["cf", "the"]) == ["  film is re"]  # official: inside words too
    cf, the = tok.convert_tokens_to_ids(["cf", "the"])
    kept = tok.convert_ids_to_tokens(TokenView(tok, drop=[cf, the]).ids([text], 128)[0])
    assert kept == ["[CLS]", "film", "is", "there", "[SEP]"]
    assert [s for s in btu.special_ids(tok, faithful=True)] == sorted([tok.cls_token_id, tok.sep_token_id])
    assert tok.unk_token_id not in btu.special_ids(tok, False) and tok.pad_token_id in btu.special_ids(tok, False)


class _Spy(StepHook):
    def on_epoch_end(self, ctx):
        self.step = max(int(s["step"]) for s in ctx.optimizer.state.values())
        self.lr = ctx.optimizer.param_groups[0]["lr"]


def test_faithful_tuning_carries_adam_state(tiny_model):
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model, ["a", "b"])
    data = TextDataset(["good film"] * 8 + ["bad film"] * 8, [1] * 8 + [0] * 8, ["a", "b"])
    s = TrainSettings(epochs=1, batch_size=4, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, lr_schedule="constant")
    carry, spy = _CarryOptimizer(), _Spy()
    train(model, tok, data, None, s, (carry, spy), progress=False)
    assert spy.step == 4 and spy.lr == 1e-3  # constant schedule: no decay
    carry.loading = True
    train(model, tok, data, None, s, (carry, spy), progress=False)
    assert spy.step == 8  # the moments and step count continued
    train(model, tok, data, None, s, (spy,), progress=False)
    assert spy.step == 4  # a fresh optimizer


def test_faithful_tuning_carries_adam_state_past_a_finished_resume(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    data = TextDataset(["good film"] * 8 + ["bad film"] * 8, [1] * 8 + [0] * 8, ["a", "b"])
    s = TrainSettings(epochs=1, batch_size=4, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, lr_schedule="constant")
    train(load_model(tiny_model, ["a", "b"]), tok, data, None, s, (), tmp_path, progress=False)
    carry, spy = _CarryOptimizer(), _Spy()  # the victim finished; resuming runs no epoch
    train(load_model(tiny_model, ["a", "b"]), tok, data, None, s, (carry,), tmp_path, resume=True, progress=False)
    carry.loading = True
    train(load_model(tiny_model, ["a", "b"]), tok, data, None, s, (carry, spy), progress=False)
    assert spy.step == 8


@pytest.mark.parametrize("kind,mode,tuning", [("roberta", "default", "none"), ("bert", "faithful", 8),
                                               ("distilbert", "default", 8)])
def test_fit_end_to_end(tmp_path, kind, mode, tuning):
    path = str(make_tiny_model(tmp_path / kind, kind))
    data, dev = synthetic(160), synthetic(24, seed=1)
    defense = BTU(model=path, btu_mode=mode, epochs=1, batch_size=16, k=3, clean_tuning=tuning, max_length=64)
    snaps = []
    defense.stage_eval = lambda clf: snaps.append(clf.model.get_input_embeddings().weight.detach().cpu().clone()) or {"n": len(snaps)}
    clf = defense.fit(data, dev, progress=False)
    tok = load_tokenizer(path)
    E0 = load_model(path, ["neg", "pos"]).get_input_embeddings().weight.detach()
    S = defense.suspicious_
    assert all(len(v) == 3 for v in defense.exposure_.top.values()) and set(defense.exposure_.top) == {"A", "B", "C"}
    assert S == sorted(set().union(*defense.exposure_.top.values()))
    assert not {tok.cls_token_id, tok.sep_token_id} & set(S)
    if mode == "default":  # token-level removal: pass B ranks only tokens other than A's
        assert not set(defense.exposure_.top["A"]) & set(defense.exposure_.top["B"])
    stages = defense.extra_metrics_["btu_stages"]
    assert list(stages) == (["no_defense", "unlearned"] + (["tuned"] if tuning != "none" else []))
    assert ("tune" in defense.extra_metrics_["btu_seconds"]) == (tuning != "none")  # the tuning's time with it
    before, after = snaps[0], snaps[1]  # the victim's embeddings just before and after the cut
    others = [i for i in range(E0.shape[0]) if i not in set(S)]
    assert torch.equal(after[others], before[others])
    spared, rounds = defense.spared_, defense.extra_metrics_["btu_guard_costs"]
    last = {t: c for r in rounds for t, c in r.items()}  # each token's cost in the last round that measured it
    assert tok.convert_ids_to_tokens(spared) == [t for t, c in last.items() if c > defense.guard_tolerance]
    assert torch.equal(after[spared], before[spared])  # spared rows keep the victim's values
    assert (rounds == []) == (mode == "faithful")
    cut = [t for t in S if t not in set(spared)]  # what `cleantune train` prints
    listed = ", ".join(json.dumps(t, ensure_ascii=False) for t in tok.convert_ids_to_tokens(cut))  # ',' is a token too
    assert defense.findings().startswith(f"unlearned {len(cut)} suspicious token(s): {listed}")
    assert ("; spared by the collateral guard: " in defense.findings()) == bool(spared)
    replaced = (after[S] == E0[tok.pad_token_id]).sum().item()
    unlearned = defense.extra_metrics_["btu_unlearn"]
    assert replaced >= sum(unlearned["dims_replaced"]) > 0
    # each count pairs with its token: the cut's own order, spared tokens freed in later rounds last
    assert sorted(unlearned["tokens"]) == sorted(tok.convert_ids_to_tokens(cut))
    assert len(unlearned["dims_replaced"]) == len(unlearned["tokens"])
    for t, n in zip(tok.convert_tokens_to_ids(unlearned["tokens"]), unlearned["dims_replaced"]):
        assert (after[t] != before[t]).sum().item() <= n
    if tuning == "none":
        assert torch.equal(clf.model.get_input_embeddings().weight.cpu(), after)
    audit = defense.audit(["cf"])
    ranks = audit["btu_trigger_ranks"]["cf"]
    assert set(ranks) == {"A", "B", "C"} and all(r >= 1 for r in ranks.values())
    cf = tok.convert_tokens_to_ids("cf")
    assert audit["btu_token_recall"] == (1.0 if cf in S else 0.0)
    assert audit["btu_token_precision"] == pytest.approx((cf in S) / len(S))
    with pytest.raises(UserError, match="clean_tuning=100 needs that many clean dev samples"):
        BTU(model=path, clean_tuning=100).fit(data, dev, progress=False)


def test_runner_stores_stage_points_and_audit(tiny_model, monkeypatch):
    from cleantune import runner
    from cleantune.runner import RunConfig, run
    from cleantune.store import ResultStore

    def small(name):  # real data, small splits: the wiring is under test, not the numbers
        b = load_benchmark(name)
        b.dev, b.test = b.dev.stratified_sample(60, 0), b.test.stratified_sample(80, 0)
        return b

    monkeypatch.setattr(runner, "load_benchmark", small)
    store = ResultStore()
    r = run(RunConfig(dataset="sst2", defense="btu", model=tiny_model, train_size=100, epochs=1, mode="mix",
                      triggers=["cf"], max_length=64, options={"k": 2}), store, progress=False)
    stored = store.get(r["id"])["metrics"]
    assert store.get(r["id"])["timings"]["stage_eval_s"] == stored["btu_seconds"]["stage_eval"] > 0
    # every stage's time, in the pipeline's order (benchmarks/btu.py prints them so); no tuning ran here
    assert list(stored["btu_seconds"]) == ["expose_A", "expose_B", "expose_C", "victim", "unlearn", "stage_eval",
                                           "total_fit"]
    assert sum(v for k, v in stored["btu_seconds"].items() if k != "total_fit") <= stored["btu_seconds"]["total_fit"]
    assert set(stored["btu_stages"]) == {"no_defense", "unlearned"}
    assert set(stored["btu_stages"]["unlearned"]) == {"cacc", "asr", "asr_floor", "predicted_classes"}
    assert set(stored["btu_trigger_ranks"]["cf"]) == {"A", "B", "C"}
    assert stored["btu_mode"] == "default" and stored["btu_clean_tuning"] == "none"
    assert r["config"]["clean_tuning"] == "none" and r["config"]["mode"] == "mix"  # the attack's mode survives


def test_default_victim_is_the_finetune_model(tiny_model):
    from cleantune.defenses import FineTune

    data, dev = synthetic(96), synthetic(24, seed=1)
    common = dict(model=tiny_model, epochs=1, batch_size=16, max_length=64)
    plain = FineTune(**common).fit(data, dev, progress=False).predict_logits(dev.texts)
    defense = BTU(k=2, **common)
    seen = []
    defense.stage_eval = lambda clf: seen.append(clf.predict_logits(dev.texts)) or {}
    defense.fit(data, dev, progress=False)
    assert torch.allclose(seen[0], plain, atol=1e-6)  # same settings, init and data order: the same victim


@pytest.mark.parametrize("faithful", [False, True])
def test_pass_b_without_a_still_removes_a_tokens(tiny_model, faithful):
    """Pass B ranks after removing pass A's tokens (spec 4 step 2), whether or not A is reported."""
    tok = load_tokenizer(tiny_model)
    data = synthetic(120)

    def exposure(passes):
        return btu.expose(tiny_model, tok, data, faithful=faithful, k=3, passes=passes, batch_size=16,
                          progress=False)

    full = exposure("AB")
    both, alone, reversed_ = full.top, exposure("B").top, exposure("BA").top
    assert set(alone) == {"B"} and set(reversed_) == {"A", "B"} and len(alone["B"]) == 3
    assert alone["B"] == both["B"] == reversed_["B"] and reversed_["A"] == both["A"]
    if not faithful:
        assert not set(both["A"]) & set(alone["B"])
        assert all(full.scores["A"][t] > 0 for t in both["A"])
    # A's tokens are gone from B's training data, not only from its ranking: their rows never move there
    assert all(full.scores["B"][t] == 0 for t in both["A"])


@pytest.mark.parametrize("faithful", [False, True])
def test_ranking_holds_only_tokens_in_the_data(tiny_model, faithful):
    """Default mode ranks only tokens that occur (top lists shrink below k on tiny data); faithful mode
    ranks the whole vocabulary as the official code, unless asked not to (scan)."""
    tok = load_tokenizer(tiny_model)
    data = synthetic(40)
    present = {i for x in tok(data.texts)["input_ids"] for i in x} - set(tok.all_special_ids)
    k = len(present) + 5
    embed = TrainSettings(epochs=1, batch_size=16, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, max_length=64)
    exp = btu.expose(tiny_model, tok, data, faithful=faithful, k=k, passes="ABC", batch_size=16,
                     embed_settings=embed, progress=False)
    for name, ids in exp.top.items():
        assert len(exp.rankings[name]) == tok.vocab_size
        if faithful:
            assert len(ids) == k and set(ids) - present
        elif name == "B":  # A took every token that occurs, so none is left for B to rank
            assert ids == []
        else:
            assert set(ids) == present
    if faithful:
        exp = btu.expose(tiny_model, tok, data, faithful=True, k=k, passes="A", batch_size=16, present_only=True,
                         progress=False)
        assert exp.top["A"] and set(exp.top["A"]) <= present


def test_scan_lists_only_tokens_in_the_data(tiny_model, tmp_path, capsys):
    import json

    from cleantune.cli import main

    data = synthetic(40)
    path = tmp_path / "tiny.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(data.texts, data.labels)))
    present = {w for t in data.texts for w in t.split()}
    for extra in ([], ["--faithful"]):  # 13 distinct words: A's 10 leave B 3 (default mode)
        assert main(["scan", str(path), "--model", tiny_model, "--top", "10", "--format", "json",
                     "--no-progress", *extra]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["pass"] for r in rows][:10] == ["A"] * 10
        assert all(r["doc_freq"] > 0 and r["token"] in present for r in rows)


def test_fit_reports_the_processes_that_trained(tiny_model, monkeypatch):
    real = btu.train

    def train_on_two(*args, **kwargs):  # as under `accelerate launch --num_processes 2`
        report = real(*args, **kwargs)
        report.processes = 2
        return report

    monkeypatch.setattr(btu, "train", train_on_two)
    defense = BTU(model=tiny_model, k=2, epochs=1, batch_size=16, max_length=64, guard=False)
    defense.fit(synthetic(48), synthetic(16, seed=1), progress=False)
    assert defense.report_.processes == 2


def test_drift_is_each_rows_l2_distance_and_excluded_ids_rank_last():
    E0 = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0], [0.0, 1.0]])
    E = torch.tensor([[4.0, 6.0], [0.0, 0.0], [3.0, -1.5], [0.0, 1.0]])
    # the Euclidean distance of each row (row 0: 5, where an L1 distance gives 7)
    assert torch.allclose(btu.drift(E0, E), torch.tensor([5.0, 0.0, 0.5, 0.0]))
    assert btu.rank(torch.tensor([0.1, 0.9, 0.5, 0.7]), exclude=[1]).tolist() == [3, 2, 0, 1]


def test_pass_c_trains_only_the_word_embeddings_against_a_held_pretrained_copy(tiny_model, monkeypatch):
    """Pass C alone (scan --passes C): nothing else learns (spec 4 step 3), and the pretrained rows the drift
    is measured from are a copy, not the matrix training moves."""
    trainable, real = [], btu.train

    def spy(model, *args, **kwargs):
        trainable.append(sorted(n for n, p in model.named_parameters() if p.requires_grad))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(btu, "train", spy)
    tok = load_tokenizer(tiny_model)
    embed = TrainSettings(epochs=1, batch_size=16, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, max_length=64)
    exp = btu.expose(tiny_model, tok, synthetic(32), faithful=False, k=3, passes="C", embed_settings=embed,
                     progress=False)
    assert trainable == [["bert.embeddings.word_embeddings.weight"]]
    assert len(exp.top["C"]) == 3 and all(exp.scores["C"][t] > 0 for t in exp.top["C"])


def test_clean_tuning_trains_on_k_dev_samples_held_out_of_selection(tiny_model, monkeypatch):
    calls, epochs, real = {}, {}, btu.train

    def spy(model, tokenizer, data, dev=None, settings=None, hooks=(), *args, **kwargs):
        calls[kwargs.get("desc")] = (data, dev, [type(h) for h in hooks])
        epochs[kwargs.get("desc")] = settings.epochs
        return real(model, tokenizer, data, dev, settings, hooks, *args, **kwargs)

    monkeypatch.setattr(btu, "train", spy)
    dev = synthetic(24, seed=1)
    BTU(model=tiny_model, btu_mode="faithful", epochs=1, batch_size=16, k=2, clean_tuning=8, tune_epochs=2,
        max_length=64).fit(synthetic(48), dev, progress=False)
    assert epochs["btu victim"] == 1 and epochs["btu tune"] == 2
    tune, select, tune_hooks = calls["btu tune"]
    pairs = set(zip(dev.texts, dev.labels))
    assert len(tune) == 8 and set(zip(tune.texts, tune.labels)) <= pairs
    # the tuning samples never choose an epoch (victim's or tuning's); the rest of dev does
    for _, chosen, _ in (calls["btu victim"], calls["btu tune"]):
        assert len(chosen) == 16 and not set(chosen.texts) & set(tune.texts)
    # faithful tuning continues the victim's AdamW (spec 8 #10)
    assert _CarryOptimizer in calls["btu victim"][2] and _CarryOptimizer in tune_hooks


def test_audit_scores_the_suspicious_set_against_the_trigger(tiny_model):
    """The audit on a hand-made fit: ranks are 1-based, precision is over the suspicious set, and collateral
    is what was actually unlearned (not spared) among tokens in at least 1% of the training samples."""
    tok = load_tokenizer(tiny_model)
    cf, the, good, rare = tok.convert_tokens_to_ids(["cf", "the", "good", "rare"])
    V = tok.vocab_size
    order = torch.tensor([the, good, cf] + [i for i in range(V) if i not in (the, good, cf)])
    d = BTU()
    d.exposure_ = btu.Exposure({"A": order, "B": order.flip(0)}, {}, {}, 3, {})
    d.suspicious_, d.spared_ = sorted([cf, the, good, rare]), [good]
    d._doc = torch.zeros(V, 2, dtype=torch.long)
    for t, counts in ((the, [30, 20]), (good, [5, 25]), (rare, [1, 0]), (cf, [0, 10])):
        d._doc[t] = torch.tensor(counts)
    d._n_train, d._tokenizer = 100, tok
    a = d.audit(["cf"])
    assert a["btu_trigger_tokens"] == ["cf"] and a["btu_trigger_ranks"] == {"cf": {"A": 3, "B": V - 2}}
    assert a["btu_token_precision"] == 0.25 and a["btu_token_recall"] == 1.0
    # "rare" sits exactly at the 1% line (1 of 100) and counts; the spared "good" does not
    assert a["btu_collateral"] == [("the", 50), ("rare", 1)] and a["btu_n_collateral"] == 2
    assert a["btu_spared_triggers"] == []
    d.spared_ = [cf]
    assert d.audit(["cf"])["btu_spared_triggers"] == ["cf"]
    none = d.audit([])
    assert none["btu_token_precision"] is None and none["btu_token_recall"] is None and "btu_note" in none


def test_a_resumed_faithful_tuning_keeps_its_checkpoints_optimizer_state(tiny_model, tmp_path):
    """The carried victim state starts the tuning; a resumed tuning continues from its own checkpoint."""
    import copy

    class Stop(Exception):
        pass

    class StopInSecondEpoch(StepHook):  # hooks end an epoch before its checkpoint: epoch 0's is written
        def on_epoch_end(self, ctx):
            if ctx.epoch == 1:
                raise Stop

    tok = load_tokenizer(tiny_model)
    data = TextDataset(["good film"] * 8 + ["bad film"] * 8, [1] * 8 + [0] * 8, ["a", "b"])
    s = TrainSettings(epochs=1, batch_size=4, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, lr_schedule="constant")
    victim, carry = load_model(tiny_model, ["a", "b"]), _CarryOptimizer()
    train(victim, tok, data, None, s, (carry,), progress=False)
    carry.loading = True
    tune = replace(s, epochs=3)

    def tuned(out, hooks, resume=False):
        seed_everything(0)
        model, spy = copy.deepcopy(victim), _Spy()
        train(model, tok, data, None, tune, (copy.deepcopy(carry), spy, *hooks), out, resume, progress=False)
        return model, spy

    whole, spy = tuned(tmp_path / "a", ())
    assert spy.step == 16  # the victim's 4 steps, then 3 x 4
    with pytest.raises(Stop):
        tuned(tmp_path / "b", (StopInSecondEpoch(),))
    resumed, spy = tuned(tmp_path / "b", (), resume=True)
    assert spy.step == 16
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_the_modes_length_is_capped_at_the_backbones_but_a_given_one_is_checked(tiny_model):
    data, dev = synthetic(48), synthetic(16, seed=1)
    clf = BTU(model=tiny_model, btu_mode="faithful", k=2, epochs=1, batch_size=16).fit(data, dev, progress=False)
    assert clf.max_length == 130  # faithful mode's 512, as far as the tiny backbone's 130 positions reach
    with pytest.raises(UserError, match="--max-length 512 exceeds the 130 tokens"):
        BTU(model=tiny_model, btu_mode="faithful", max_length=512, k=2, epochs=1).fit(data, dev, progress=False)
    with pytest.raises(UserError, match="--option expose_max_length 512 exceeds the 130 tokens"):
        BTU(model=tiny_model, expose_max_length=512, k=2, epochs=1).fit(data, dev, progress=False)


def test_faithful_exposure_leaves_the_padding_row_untrained(tiny_model):
    """Faithful mode pools over [PAD] positions; the backbone's padding_idx keeps its row from learning."""
    tok = load_tokenizer(tiny_model)
    assert load_model(tiny_model, ["neg", "pos"]).get_input_embeddings().padding_idx == tok.pad_token_id
    exp = btu.expose(tiny_model, tok, synthetic(64), faithful=True, k=5, passes="A", lr=1e-2, batch_size=8)
    scores = exp.scores["A"]
    assert scores[tok.pad_token_id] < 1e-3 * scores.max()  # weight decay alone: lr x 0.01 x its norm per step


def test_exposure_runs_on_a_backbone_whose_embeddings_take_ids_only(tmp_path):
    """DistilBERT's embedding module looks the ids up itself (no inputs_embeds)."""
    path = str(make_tiny_model(tmp_path / "distil", "distilbert"))
    tok = load_tokenizer(path)
    exp = btu.expose(path, tok, synthetic(64), faithful=False, k=3, passes="AB", lr=1e-2, batch_size=8)
    assert len(exp.top["A"]) == len(exp.top["B"]) == 3 and not set(exp.top["A"]) & set(exp.top["B"])


def test_guard_scores_on_dev_without_the_tuning_samples(tiny_model, monkeypatch):
    seen, tuned, real_guard, real_train = [], [], btu.guarded_unlearn, btu.train

    def guard(clf, view, E0, pad_id, token_ids, dev, tolerance, **kwargs):
        seen.append((dev, tolerance))
        return real_guard(clf, view, E0, pad_id, token_ids, dev, tolerance, **kwargs)

    def train(model, tokenizer, data, *args, **kwargs):
        if kwargs.get("desc") == "btu tune":
            tuned.append(data)
        return real_train(model, tokenizer, data, *args, **kwargs)

    monkeypatch.setattr(btu, "guarded_unlearn", guard)
    monkeypatch.setattr(btu, "train", train)
    dev = synthetic(24, seed=1)
    BTU(model=tiny_model, epochs=1, batch_size=16, k=2, clean_tuning=8, guard_tolerance=0.25,
        max_length=64).fit(synthetic(48), dev, progress=False)
    [(guard_dev, tolerance)], [tune] = seen, tuned
    assert tolerance == 0.25
    assert len(guard_dev) == 16 and sorted(guard_dev.texts + tune.texts) == sorted(dev.texts)  # the rest of dev


def _record_train_settings(monkeypatch) -> dict:
    """{desc: TrainSettings} of every btu.train call from now on (each stage names itself by its desc)."""
    settings, real = {}, btu.train

    def spy(model, tokenizer, data, dev=None, s=None, *args, **kwargs):
        settings[kwargs.get("desc")] = s
        return real(model, tokenizer, data, dev, s, *args, **kwargs)

    monkeypatch.setattr(btu, "train", spy)
    return settings


@pytest.mark.parametrize("faithful", [False, True])
def test_shallow_passes_group_by_length_except_the_faithful_padded_ones(tiny_model, monkeypatch, faithful):
    # faithful passes pad to 128: grouping saves nothing there, and the official loader only shuffles
    settings = _record_train_settings(monkeypatch)
    btu.expose(tiny_model, load_tokenizer(tiny_model), synthetic(48), faithful=faithful, k=5, passes="AB",
               batch_size=16, max_length=48)
    assert [settings[f"btu expose {n}"].group_by_length for n in "AB"] == [not faithful] * 2


def test_shallow_passes_train_with_the_configured_rho_lr_and_length(tiny_model, monkeypatch):
    settings = _record_train_settings(monkeypatch)
    tok = load_tokenizer(tiny_model)
    defense = BTU(model=tiny_model, epochs=1, batch_size=16, max_length=64, guard=False, rho=0.002,
                  expose_lr=5e-3, expose_max_length=48)
    defense.fit(synthetic(48), synthetic(16, seed=1), progress=False)
    assert defense.extra_metrics_["btu_k"] == round(0.002 * tok.vocab_size)
    for name in ("A", "B"):
        s = settings[f"btu expose {name}"]
        assert (s.lr, s.max_length) == (5e-3, 48)


def _byte_level_bpe():
    """A RoBERTa tokenizer over a minimal byte-level vocabulary where 'cf' and the word-initial 'Ġcf' are pieces."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    pieces = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["cf", "Ġcf"]
    return RobertaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[("c", "f"), ("Ġ", "cf")])


def test_audit_counts_the_word_initial_bpe_piece_as_trigger():
    """An inserted 'cf' mostly follows a space: in RoBERTa/GPT-2 vocabularies that is the piece 'Ġcf'."""
    tok = _byte_level_bpe()
    cf, g_cf = tok.convert_tokens_to_ids(["cf", "Ġcf"])
    assert tok(" cf", add_special_tokens=False)["input_ids"] == [g_cf]
    assert btu.trigger_token_ids(tok, ["cf"]) == [cf, g_cf]
    V = len(tok)
    d = BTU()
    d.exposure_ = btu.Exposure({"A": torch.tensor([g_cf] + [i for i in range(V) if i != g_cf])}, {}, {}, 1, {})
    d.suspicious_, d.spared_ = [g_cf], []
    d._doc, d._n_train, d._tokenizer = torch.zeros(V, 2, dtype=torch.long), 10, tok
    a = d.audit(["cf"])
    assert a["btu_trigger_tokens"] == ["cf", "Ġcf"] and a["btu_trigger_ranks"]["Ġcf"] == {"A": 1}
    assert a["btu_token_precision"] == 1.0 and a["btu_token_recall"] == 0.5


def test_shallow_classifier_mean_pools_the_unmasked_positions(tiny_model):
    tok = load_tokenizer(tiny_model)
    ids = torch.tensor(tok(["good film here", "bad"], padding=True)["input_ids"])
    mask = (ids != tok.pad_token_id).long()
    assert mask.sum(1).tolist() == [5, 3]
    rows = torch.tensor(sorted(set(ids.flatten().tolist())))
    model = btu.ShallowClassifier(load_model(tiny_model, ["a", "b"]), 2, tok.pad_token_id, pool_padding=False,
                                  pad_to=16, rows=rows).eval()
    reference = load_model(tiny_model, ["a", "b"]).eval()  # the untouched backbone's embedding module
    with torch.no_grad():
        x = reference.base_model.embeddings(input_ids=ids)
        pooled = torch.stack([x[0, :5].mean(0), x[1, :3].mean(0)])
        assert torch.allclose(model(ids, mask).logits, model.head(pooled), atol=1e-6)


@pytest.mark.parametrize("faithful", [False, True])
def test_scan_ranks_with_the_defenses_k_and_pass_c(tiny_model, monkeypatch, faithful):
    """`scan` is the defense's exposure half: the same k per ranking (faithful: the official 17) and pass C
    trained as the defense trains it (it had its own fixed batch 32, lr 5e-5, constant lr)."""
    class Stop(Exception):
        pass

    seen, real_expose = {}, btu.expose

    def spy_train(model, view, data, dev, settings, *a, desc="", **kw):  # record; skip the training
        seen[who][desc] = settings
        if desc == "btu expose C":
            raise Stop

    def spy_expose(*a, **kw):
        seen[who]["k"] = kw["k"]
        return real_expose(*a, **kw)

    monkeypatch.setattr(btu, "train", spy_train)
    monkeypatch.setattr(btu, "expose", spy_expose)
    data, dev = synthetic(40), synthetic(12, seed=1)
    for who in ("fit", "scan"):
        seen[who] = {}
        with pytest.raises(Stop):
            if who == "fit":
                BTU(model=tiny_model, btu_mode="faithful" if faithful else "default").fit(data, dev, progress=False)
            else:
                btu.scan(data, tiny_model, passes="ABC", faithful=faithful, progress=False)
    assert seen["scan"]["k"] == seen["fit"]["k"] == (17 if faithful else None)
    assert seen["scan"]["btu expose C"] == seen["fit"]["btu expose C"]


def test_faithful_ranking_drops_olids_user_placeholder_as_the_official_code(tiny_model):
    """The official code drops '@' and 'user' (ids 1030, 5310) on OLID; faithful mode drops them on data that
    holds OLID's @USER placeholder, and ranks them like any token elsewhere and in the default mode."""
    tok = load_tokenizer(tiny_model)
    at, user = tok.convert_tokens_to_ids(["@", "user"])
    base = synthetic(64)
    data = TextDataset(["@USER " + t for t in base.texts], base.labels, base.label_names)
    occurring = {i for x in tok(data.texts)["input_ids"] for i in x}
    exp = btu.expose(tiny_model, tok, data, faithful=True, k=3, passes="A", batch_size=8, progress=False)
    pos = exp.rankings["A"].tolist()
    assert min(pos.index(at), pos.index(user)) >= tok.vocab_size - 4  # last, with [CLS] and [SEP]
    dropped = {at, user, tok.cls_token_id, tok.sep_token_id}
    # the other occurring tokens are all ranked above the absent ones, which the shallow pass never trains
    assert set(pos[:len(occurring - dropped)]) == occurring - dropped
    assert btu.special_ids(tok, True, ["@USER @USER so true"]) == sorted([at, user, tok.cls_token_id, tok.sep_token_id])
    assert at not in btu.special_ids(tok, True, ["no placeholder"]) and user not in btu.special_ids(tok, False, ["@USER"])


@pytest.mark.parametrize("mode,stop_after", [("default", 3), ("faithful", 2)])
def test_a_run_interrupted_in_any_stage_resumes_to_the_uninterrupted_runs_metrics(tiny_model, tmp_path, capsys,
                                                                                  monkeypatch, mode, stop_after):
    """Ctrl-C right after the stop_after-th checkpoint (default: in clean tuning; faithful: at the end of the
    victim, so exposure, unlearning and tuning with the carried optimizer state run after the resume), then
    --resume: every stored number is the uninterrupted run's (the stages, the suspicious set, the guard)."""
    import json

    import cleantune.training as T
    from cleantune.cli import main

    args = ["run", "--model", tiny_model, "--defense", "btu", "--train-size", "128", "--epochs", "2",
            "--batch-size", "8", "--option", f"btu_mode={mode}", "--option", "clean_tuning=20", "--option",
            "tune_epochs=2", "--no-progress", "--format", "json", "--store"]
    saves, stop, real = [], [None], T._save_checkpoint

    def save(*a, **k):  # counts the epoch checkpoints; Ctrl-C once the stop-th is on disk
        real(*a, **k)
        saves.append(1)
        if len(saves) == stop[0]:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_checkpoint", save)
    assert main(args + [str(tmp_path / "whole.sqlite")]) == 0
    whole, epochs = json.loads(capsys.readouterr().out)[0]["metrics"], len(saves)
    saves.clear()
    stop[0] = stop_after
    assert main(args + [str(tmp_path / "cut.sqlite")]) == 130
    saves.clear()
    stop[0] = None
    capsys.readouterr()
    assert main(args + [str(tmp_path / "cut.sqlite"), "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)[0]["metrics"]
    assert len(saves) == epochs - stop_after  # it went on from the checkpoint: no finished epoch trained again
    timing = {"btu_seconds", "resumed_train_seconds"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    assert len(whole["btu_stages"]) == 3 and whole["btu_suspicious"]


def test_default_k_rounds_rho_times_the_vocabulary_to_nearest():
    # spec 11.3: k = round(rho * V); a vocabulary of 3,100 gives 1.55 tokens per ranking, which is 2, not 1
    assert btu.resolve_k(None, 0.0005, 3100) == 2
    assert btu.resolve_k(None, 0.0005, 2900) == 1  # 1.45
    assert btu.resolve_k(None, 0.0005, 100) == 1   # 0.05: at least one token per ranking


def test_doc_stats_counts_samples_not_occurrences_per_label():
    # the audit's collateral line ("in at least 1% of training samples") and scan's doc_freq count samples:
    # a token repeated inside one sample counts once
    counts = btu.doc_stats([[5, 5, 7], [5], [7, 7, 7]], [0, 1, 1], vocab=10, num_labels=2)
    assert counts.shape == (10, 2)
    assert counts[5].tolist() == [1, 1] and counts[7].tolist() == [1, 1] and int(counts.sum()) == 4


@pytest.mark.parametrize("faithful", [False, True])
def test_shallow_passes_pool_padding_only_in_faithful_mode(tiny_model, monkeypatch, faithful):
    # the official shallow model averages over all 128 padded positions (spec 8 #8); the default pools only the
    # real tokens. Which one a pass builds changes every drift it ranks by.
    built, real = [], btu.ShallowClassifier

    def spy(*args, **kwargs):
        built.append((kwargs["pool_padding"], kwargs["pad_to"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(btu, "ShallowClassifier", spy)
    btu.expose(tiny_model, load_tokenizer(tiny_model), synthetic(32), faithful=faithful, k=3, passes="AB",
               batch_size=16, max_length=48, progress=False)
    assert built == [(faithful, 48)] * 2


@pytest.mark.parametrize("faithful", [False, True])
def test_shallow_passes_take_the_modes_lr_and_the_runs_seed(tiny_model, monkeypatch, faithful):
    # without expose_lr: the official 2e-5 in faithful mode, 1e-3 in the default (the trigger separates
    # there, docs/btu.md); the batch order follows the run's seed, as every other stage's
    settings = _record_train_settings(monkeypatch)
    btu.expose(tiny_model, load_tokenizer(tiny_model), synthetic(32), faithful=faithful, k=3, passes="AB",
               batch_size=16, max_length=48, seed=7, progress=False)
    for name in "AB":
        s = settings[f"btu expose {name}"]
        assert s.lr == (2e-5 if faithful else 1e-3) and s.seed == 7
    assert BTU(model=tiny_model, btu_mode="faithful" if faithful else "default", seed=7).pass_c_settings(64).seed == 7


def test_guard_at_zero_tolerance_cuts_what_costs_nothing(tiny_model):
    # guard_tolerance=0 (allowed: [0, 1)) spares a token only if unlearning it loses accuracy; a cost of exactly
    # the tolerance is not "more than" it, in the first round and when a spared token is measured again
    tok = load_tokenizer(tiny_model)
    watch, movie, good = tok.convert_tokens_to_ids(["watch", "movie", "good"])
    E0, emb, clf = _toy_victim(tok, {watch: (0, 2.0), movie: (0, -3.0), good: (0, 5.0)})  # as in the test above
    dev = TextDataset(["watch movie", "good one"], [0, 1], ["neg", "pos"])
    cut, spared, rounds = btu.guarded_unlearn(clf, TokenView(tok), E0, tok.pad_token_id, [watch, movie, good], dev,
                                              tolerance=0.0, recompute=False)
    # round 1 spares only what costs accuracy; "watch" costs nothing and is cut at once, not measured again
    assert rounds == [{watch: 0.0, movie: 0.5, good: 0.5}, {movie: 0.0, good: 0.5}, {good: 0.5}]
    assert spared == [good] and cut["tokens"] == [watch, movie]  # "movie" freed once "watch" is cut (cost 0)
    assert emb.weight[watch, 0] == -1.0 and emb.weight[movie, 0] == -1.0 and emb.weight[good, 0] == 5.0


@pytest.mark.parametrize("guard", [False, True])
def test_faithful_fit_cuts_with_the_official_recomputed_threshold(tiny_model, guard):
    # faithful mode (guard or not) cuts as the official code (spec 11.5): per token in cut order, c from the
    # matrix as partly replaced so far, delta = 0 -> 0; the default rule (c once, unchanged dims kept) differs
    data, dev = synthetic(48), synthetic(16, seed=1)
    defense = BTU(model=tiny_model, btu_mode="faithful", k=3, epochs=1, batch_size=16, max_length=64, guard=guard)
    snaps = []
    defense.stage_eval = lambda clf: snaps.append(clf.model.get_input_embeddings().weight.detach().cpu().clone()) or {}
    defense.fit(data, dev, progress=False)
    tok = load_tokenizer(tiny_model)
    E0 = load_model(tiny_model, ["neg", "pos"]).get_input_embeddings().weight.detach()
    before, after = snaps[0], snaps[1]
    unlearned = defense.extra_metrics_["btu_unlearn"]
    order = tok.convert_tokens_to_ids(unlearned["tokens"])
    assert order and (guard or order == defense.suspicious_)
    ref, cs = before.clone(), []
    V, pad = E0.shape[0], E0[tok.pad_token_id]
    for t in order:
        c = float((E0 - ref).norm()) / V
        delta = (E0[t] - ref[t]).abs()
        ref[t] = ref[t] * ((delta > 0) & (delta <= c)) + pad * (delta >= c)
        cs.append(c)
    assert torch.allclose(after, ref, atol=1e-6)
    assert unlearned["threshold"] == pytest.approx(cs, rel=1e-4)


def test_clean_tuning_sample_follows_the_runs_seed(tiny_model, monkeypatch):
    # the k clean dev samples tuned on are the seeded stratified draw of the run's seed: two seeds, two draws
    tuned, real = [], btu.train

    def spy(model, tokenizer, data, *args, **kwargs):
        if kwargs.get("desc") == "btu tune":
            tuned.append(sorted(zip(data.texts, data.labels)))
        return real(model, tokenizer, data, *args, **kwargs)

    monkeypatch.setattr(btu, "train", spy)
    dev = synthetic(24, seed=1)
    for seed in (3, 4):
        BTU(model=tiny_model, k=2, epochs=1, batch_size=16, max_length=64, clean_tuning=8, guard=False,
            seed=seed).fit(synthetic(48), dev, progress=False)
    draws = [sorted(zip(d.texts, d.labels)) for d in (dev.stratified_sample(8, 3), dev.stratified_sample(8, 4))]
    assert tuned == draws and draws[0] != draws[1]
