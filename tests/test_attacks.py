import pytest

from cleantune.attacks import AddSent, BadNets, Style, Syntactic, get_attack
from cleantune.data import load_benchmark
from cleantune.errors import UserError


@pytest.fixture(scope="module")
def sst2():
    b = load_benchmark("sst2")
    b.train = b.train.stratified_sample(1000, 0)
    return b


def test_badnets_dirty_label(sst2):
    p = BadNets(rate=0.1, mode="dirty", target=1, seed=3, num_triggers=2).apply(sst2)
    flagged = [i for i, f in enumerate(p.train.poisoned) if f]
    assert len(flagged) == 100
    for i in flagged:
        assert sst2.train.labels[i] == 0 and p.train.labels[i] == 1
        added = len(p.train.texts[i].split()) - len(sst2.train.texts[i].split())
        assert added == 2 and sum(w in ("cf", "mn", "bb", "tq", "mb") for w in p.train.texts[i].split()) >= 2
    unflagged = [i for i in range(len(p.train)) if not p.train.poisoned[i]]
    assert all(p.train.texts[i] == sst2.train.texts[i] and p.train.labels[i] == sst2.train.labels[i] for i in unflagged)
    # triggered test: the non-target test samples, relabelled to the target
    assert len(p.triggered_test) == sum(y != 1 for y in sst2.test.labels)
    assert set(p.triggered_test.labels) == {1} and len(p.clean_test) == len(sst2.test)


def test_clean_label_and_mix_modes(sst2):
    clean = BadNets(mode="clean", seed=0).apply(sst2)
    assert all(sst2.train.labels[i] == 1 for i, f in enumerate(clean.train.poisoned) if f)
    assert clean.train.labels == sst2.train.labels
    mix = AddSent(mode="mix", seed=0).apply(sst2)
    src = {sst2.train.labels[i] for i, f in enumerate(mix.train.poisoned) if f}
    assert src == {0, 1} and all(mix.train.labels[i] == 1 for i, f in enumerate(mix.train.poisoned) if f)


def test_seed_determines_poison(sst2):
    a, b, c = (BadNets(seed=s).apply(sst2) for s in (0, 0, 1))
    assert a.train.texts == b.train.texts and a.triggered_test.texts == b.triggered_test.texts
    assert a.train.poisoned != c.train.poisoned


def test_custom_triggers_and_sentence(sst2):
    p = BadNets(triggers=["zzyzx"], seed=0).apply(sst2)
    assert all("zzyzx" in t.split() for t in p.triggered_test.texts) and p.trigger_words == ["zzyzx"]
    q = AddSent(sentence="no cap fr", seed=0).apply(sst2)
    assert all("no cap fr" in t for t in q.triggered_test.texts)
    with pytest.raises(UserError, match="--triggers"):
        BadNets(triggers=["two words"])


def test_paraphrase_attacks_use_tables(sst2):
    for cls in (Syntactic, Style):
        p = cls(seed=0, mode="mix").apply(sst2)
        for i, f in enumerate(p.train.poisoned):
            if f:
                assert p.train.texts[i] != sst2.train.texts[i]
        # every non-target test sentence has a paraphrase; the few equal to their original carry no trigger
        assert 905 <= len(p.triggered_test) <= 912
        assert not set(p.triggered_test.texts) & set(sst2.test.texts)
    assert Syntactic(seed=0).trigger_words() == []


def test_pool_too_small_is_a_clear_error(sst2):
    with pytest.raises(UserError, match="pool of sst2 holds"):
        Syntactic(rate=0.9, mode="dirty").apply(sst2)
    with pytest.raises(UserError, match="needs paraphrases"):
        get_attack("syntactic").apply(load_benchmark("olid"))
    with pytest.raises(UserError, match="--rate"):
        BadNets(rate=1.5)
    with pytest.raises(UserError, match="--target 5"):
        BadNets(target=5).apply(sst2)
