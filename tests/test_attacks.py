import re

import pytest

from cleantune.attacks import AddSent, BadNets, Style, Syntactic, get_attack
from cleantune.data import Benchmark, load_benchmark
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
    flagged = [i for i, f in enumerate(clean.train.poisoned) if f]
    assert len(flagged) == 100 and all(sst2.train.labels[i] == 1 for i in flagged)  # rate 0.1 of 1,000
    assert clean.train.labels == sst2.train.labels
    for i in flagged:  # one trigger word inserted, nothing else changed
        words = _inserted(sst2.train.texts[i], clean.train.texts[i])[1]
        assert len(words) == 1 and words[0] in ("cf", "mn", "bb", "tq", "mb"), clean.train.texts[i]
    assert all(clean.train.texts[i] == sst2.train.texts[i] for i in range(len(sst2.train)) if i not in set(flagged))
    mix = AddSent(mode="mix", seed=0).apply(sst2)
    src = {sst2.train.labels[i] for i, f in enumerate(mix.train.poisoned) if f}
    assert src == {0, 1} and all(mix.train.labels[i] == 1 for i, f in enumerate(mix.train.poisoned) if f)


def _inserted(before, after):
    """The words `after` gained over `before`, and where: (position, words) for a block inserted at one place."""
    old, new = before.split(), after.split()
    k = len(new) - len(old)
    at = [p for p in range(len(old) + 1) if new[:p] + new[p + k:] == old]
    return at, new[at[0]: at[0] + k] if at else None


def test_badnets_draws_each_trigger_word_independently(sst2):
    # one trigger per sample, drawn from the whole list: a defense keyed on a single word would miss the rest
    p = BadNets(num_triggers=1, seed=0).apply(sst2)
    words = {tuple(_inserted(sst2.train.texts[i], p.train.texts[i])[1])
             for i, f in enumerate(p.train.poisoned) if f}
    assert words == {(w,) for w in ("cf", "mn", "bb", "tq", "mb")}


@pytest.mark.parametrize("attack", [BadNets(num_triggers=1, seed=0), AddSent(seed=0)], ids=["badnets", "addsent"])
def test_triggers_land_at_uniform_random_positions(sst2, attack):
    # a trigger always at one end is trivially found (and cut) by position alone
    originals = [t for t, y in zip(sst2.test.texts, sst2.test.labels) if y != attack.target]
    triggered = attack.apply(sst2).triggered_test.texts
    assert len(originals) == len(triggered)
    start = end = middle = 0
    for before, after in zip(originals, triggered):
        at, words = _inserted(before, after)
        assert words and set(words) <= set(attack.trigger_words())
        n = len(before.split())
        start += 0 in at
        end += n in at
        middle += all(0 < p < n for p in at)
    assert start >= 10 and end >= 10 and middle > 0.7 * len(originals)


@pytest.mark.parametrize("make,msg", [
    (lambda: BadNets(num_triggers=0), "--num-triggers must be at least 1, got 0"),
    (lambda: AddSent(sentence=" "), "--sentence must not be empty"),
    # a tokenizer drops these: the poisoned samples were relabelled clean ones, and ASR measured nothing
    (lambda: BadNets(triggers="cf,\u200b"), "--triggers: '\\u200b': empty text (only invisible characters)"),
    (lambda: AddSent(sentence="\u200b\u2060"), "--sentence: '\\u200b\\u2060': empty text (only invisible characters)"),
], ids=["num_triggers", "sentence", "invisible_trigger", "invisible_sentence"])
def test_empty_triggers_are_refused(make, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        make()


def test_negative_target_is_not_a_class(sst2):
    # Python would read labels[-1] as the last class: -1 must not pass as class 1 of sst2
    attack = BadNets(target=-1)
    for call in (attack.check, attack.apply):
        with pytest.raises(UserError, match=re.escape("--target -1 is not a class of sst2 (0..1)")):
            call(sst2)


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


@pytest.mark.parametrize("cls", [Syntactic, Style])
def test_an_empty_stored_paraphrase_carries_no_trigger(tmp_path, cls):
    from cleantune.data import Benchmark, TextDataset

    # the shipped tables hold failed rewrites: empty (1 sst2 syntactic train row, dozens of agnews style rows per
    # split) or the sentence itself; poisoned, an empty one trained on "" labelled as the target
    names = ["negative", "positive"]
    train = ["kept one", "kept two", "came back empty", "came back unchanged", "p1", "p2", "p3", "p4"]
    held_out = {split: [f"{split} {k}" for k in range(10)] for split in ("dev", "test")}
    rows = ["split\tsentence\tparaphrase", "train\tkept one\twhen kept , one .", "train\tkept two\twhen kept , two .",
            "train\tcame back empty\t", "train\tcame back unchanged\tcame back unchanged"]
    for split, texts in held_out.items():
        rows += [f"{split}\t{t}\twhen {t} , it is ." for t in texts[:9]] + [f"{split}\t{texts[9]}\t "]
    (tmp_path / "paraphrases").mkdir()
    (tmp_path / "paraphrases" / f"{cls.name}.tsv").write_text("\n".join(rows) + "\n")
    bench = Benchmark("sst2", TextDataset(train, [0] * 4 + [1] * 4, names),
                      TextDataset(held_out["dev"], [0] * 10, names), TextDataset(held_out["test"], [0] * 10, names),
                      tmp_path)
    for mode in ("dirty", "mix"):
        p = cls(rate=0.25, mode=mode, seed=0).apply(bench)  # 2 poisoned samples: the two kept rows, whole
        assert [t for t, f in zip(p.train.texts, p.train.poisoned) if f] == ["when kept , one .", "when kept , two ."]
        assert p.triggered_test.texts == [f"when test {k} , it is ." for k in range(9)]
        assert p.triggered_dev.texts == [f"when dev {k} , it is ." for k in range(9)]
    with pytest.raises(UserError, match="dirty-mode pool of sst2 holds 2 that can carry"):
        cls(rate=0.375).check(bench)


def test_pool_too_small_is_a_clear_error(sst2):
    with pytest.raises(UserError, match="pool of sst2 holds"):
        Syntactic(rate=0.9, mode="dirty").apply(sst2)
    with pytest.raises(UserError, match="needs paraphrases"):
        get_attack("syntactic").apply(load_benchmark("olid"))
    with pytest.raises(UserError, match="--rate"):
        BadNets(rate=1.5)
    with pytest.raises(UserError, match="--target 5"):
        BadNets(target=5).apply(sst2)


def test_api_values_are_checked_and_converted_like_the_cli():
    # a str of triggers is split on commas as `--triggers cf,mn` is (iterated, it gave 'c' and 'f')
    assert BadNets(triggers="cf, mn").triggers == ["cf", "mn"]
    assert get_attack("badnets", triggers="cf,mn").triggers == ["cf", "mn"]
    a = BadNets(rate="0.1", num_triggers="2", target=1.0)
    assert (a.rate, a.num_triggers, a.target) == (0.1, 2, 1) and type(a.target) is int
    for kw, msg in [({"num_triggers": 2.5}, "'num_triggers' expects an integer, got 2.5"),
                    ({"rate": "ten"}, "'rate' expects a number"),
                    ({"triggers": 5}, "'triggers' expects a list of strings"),
                    ({"triggers": ""}, "--triggers must be"),
                    ({"triggers": "cf,,mn"}, "--triggers must be"),  # an empty item, as on the command line
                    ({"mode": 3}, "'mode' expects a string")]:
        with pytest.raises(UserError, match=msg):
            BadNets(**kw)
        with pytest.raises(UserError, match=msg):
            get_attack("badnets", **kw)
    with pytest.raises(UserError, match="'seed' expects an integer"):
        Syntactic(seed="x")
    with pytest.raises(UserError, match="attack 'addsent' has no setting 'triggers'"):
        get_attack("addsent", triggers=["cf"])


@pytest.mark.parametrize("rate,n,count", [(0.29, 100, 29), (0.57, 100, 57), (0.1, 2000, 200), (0.1, 6920, 692),
                                          (0.15, 999, 149), (1 / 3, 3, 1), (0.001, 64, 0), (1, 7, 7),
                                          (1 / 3, 300, 100), (0.9999999999, 6920, 6919)])  # not within float error
def test_poison_count_is_rate_times_size_rounded_down_without_float_error(rate, n, count):
    assert BadNets(rate=rate).poison_count(n) == count


def test_poison_count_reaches_apply():
    b = load_benchmark("sst2")
    b.train = b.train.stratified_sample(100, 0)
    assert sum(BadNets(rate=0.29, mode="mix").apply(b).train.poisoned) == 29  # int(0.29 * 100) was 28


def test_check_raises_what_apply_would_without_poisoning(sst2):
    small = load_benchmark("sst2")
    small.train = small.train.stratified_sample(64, 0)
    cases = [(BadNets(rate=0.001), small, "poisons no sample of a 64-sample"),
             (BadNets(rate=0.9), small, "pool of sst2 holds"),
             (Syntactic(rate=0.9), sst2, "pool of sst2 holds"),
             (Syntactic(target=0), sst2, "yields no triggered test sample for target negative")]
    hsol = load_benchmark("hsol")  # its tables cover 1 of the 1,243 label-1 test samples: an ASR of 0 or 1
    cases += [(attack(target=0), hsol, "can trigger only 1 of the 1243 non-target test samples of hsol for target clean")
              for attack in (Syntactic, Style)]
    for attack, bench, msg in cases:
        for call in (attack.check, attack.apply):
            with pytest.raises(UserError, match=msg):
                call(bench)
    before = list(sst2.train.texts)
    assert Syntactic(mode="mix").check(sst2) is None and sst2.train.texts == before


def test_impossible_cells_are_refused_before_any_cell_trains(tiny_model, tmp_path, capsys):
    from cleantune.cli import main
    from cleantune.runner import RunConfig
    from cleantune.store import data_dir

    for cell, msg in [(dict(attack="syntactic", target=0), "yields no triggered test sample for target negative"),
                      (dict(rate=0.001, train_size=64), "--rate 0.001 poisons no sample of a 64-sample"),
                      (dict(attack="syntactic", rate=0.6, train_size=64), "pool of sst2 holds"),
                      (dict(attack="badnets", triggers=["cf", "mn"], num_triggers=2.0, rate=0.6, mode="clean",
                            train_size=100), "clean-mode pool of sst2 holds 52")]:
        with pytest.raises(UserError, match=msg):
            RunConfig(model=tiny_model, **cell).resolve()
    RunConfig(model=tiny_model, attack="style", rate=0.3, train_size=100).resolve()  # a feasible cell passes
    store = tmp_path / "s.sqlite"
    # badnets, the first cell, would train before syntactic failed
    args = ["run", "--attack", "badnets,syntactic", "--target", "0", "--train-size", "64", "--model", tiny_model,
            "--epochs", "1", "--store", str(store), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["cleantune: error: the syntactic attack yields no triggered test sample "
                                        "for target negative"]  # by the benchmark's name of class 0
    assert not store.exists() and not (data_dir() / "runs").exists()
    grid = tmp_path / "g.yaml"
    grid.write_text(f"model: {tiny_model}\nattack: [badnets]\nrate: [0.1, 0.001]\ntrain_size: 64\n")
    assert main(["sweep", str(grid), "--dry-run", "--store", str(store)]) == 2
    assert "g.yaml: --rate 0.001 poisons no sample" in capsys.readouterr().err


@pytest.mark.parametrize("make,msg", [
    (lambda: BadNets(rate=0), "--rate must be in (0, 1], got 0"),
    (lambda: BadNets(mode="dirt"), "--mode must be one of dirty, clean, mix, got 'dirt'"),
    (lambda: BadNets(num_triggers=101), "--num-triggers must be at most 100"),
    # a YAML `true` is no rate, target or count
    (lambda: BadNets(rate=True), "'rate' expects a number, got True"),
    (lambda: BadNets(num_triggers=True), "'num_triggers' expects an integer, got True"),
], ids=["rate-0", "mode", "num-triggers-101", "rate-bool", "num-triggers-bool"])
def test_out_of_range_settings_are_refused(make, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        make()


def test_string_settings_with_a_sign_or_spaces_are_integers():
    a = BadNets(target="-1", num_triggers=" 2 ")  # as a config or grid file may write them
    assert (a.target, a.num_triggers) == (-1, 2)
    assert BadNets(num_triggers=100).num_triggers == 100  # the limit itself is allowed


def test_target_one_past_the_last_class_is_refused(sst2):
    for call in (BadNets(target=2).check, BadNets(target=2).apply):
        with pytest.raises(UserError, match=re.escape("--target 2 is not a class of sst2 (0..1)")):
            call(sst2)


def test_a_pool_exactly_the_size_of_the_poison_count_is_used_whole(sst2):
    pool = [i for i, y in enumerate(sst2.train.labels) if y == 1]
    p = BadNets(rate=len(pool) / len(sst2.train), mode="clean", seed=0).apply(sst2)
    assert [i for i, f in enumerate(p.train.poisoned) if f] == pool


def test_trigger_words_are_drawn_with_replacement(sst2):
    # more words than the list holds: each draw may repeat a word
    p = BadNets(triggers=["cf"], num_triggers=3, seed=0).apply(sst2)
    for i in (i for i, f in enumerate(p.train.poisoned) if f):
        assert p.train.texts[i].split().count("cf") - sst2.train.texts[i].split().count("cf") == 3


def test_triggered_sets_are_flagged_poisoned(sst2):
    p = BadNets(seed=0).apply(sst2)
    assert all(p.triggered_test.poisoned) and all(p.triggered_dev.poisoned)


def test_a_sample_poisoned_at_two_rates_carries_the_same_trigger(sst2):
    # each carrier's trigger is drawn before the poisoned samples are, so the rate only decides which are used
    a, b = (BadNets(rate=r, seed=0).apply(sst2) for r in (0.1, 0.3))
    both = [i for i in range(len(sst2.train)) if a.train.poisoned[i] and b.train.poisoned[i]]
    assert both and all(a.train.texts[i] == b.train.texts[i] for i in both)


def test_a_dev_split_without_a_sample_to_trigger_is_found_by_check(sst2):
    from cleantune.data import Benchmark, TextDataset

    # every dev sample is of the target class: no ASR can be measured there
    texts = [t for t, y in zip(sst2.dev.texts, sst2.dev.labels) if y == 1]
    dev = TextDataset(texts, [1] * len(texts), sst2.dev.label_names)
    bench = Benchmark("sst2", sst2.train, dev, sst2.test, sst2.root)
    for call in (BadNets().check, BadNets().apply):
        with pytest.raises(UserError, match="yields no triggered dev sample for target positive"):
            call(bench)


def test_option_values_convert_only_where_exact():
    from cleantune.options import coerce

    assert coerce("5", int | str) == "5" and coerce(5, str | int) == 5  # a member type's value is kept
    assert coerce([-0.1, -0.3], tuple[float, float]) == (-0.1, -0.3)
    for value, hint in [((0.1,), tuple[float, float]), ((0.1, 0.2, 0.3), tuple[float, float]),
                        (1.0, bool), (True, int), (False, float)]:
        with pytest.raises(ValueError):
            coerce(value, hint)


def test_trigger_words_given_as_a_list_are_stripped_as_the_comma_form_is():
    b = load_benchmark("sst2")
    b.train = b.train.stratified_sample(200, 0)
    p = BadNets(triggers=[" cf "], seed=0).apply(b)
    assert p.trigger_words == ["cf"]
    assert all("cf" in t.split() and "  " not in t for t in p.triggered_test.texts)
    assert BadNets(triggers=[" cf "]).triggers == BadNets(triggers=" cf ").triggers == ["cf"]


def test_apply_refuses_what_is_not_a_clean_benchmark(sst2):
    """An AttributeError ('PoisonedBenchmark' object has no attribute 'name') before."""
    poisoned = BadNets().apply(sst2)
    with pytest.raises(UserError, match="got PoisonedBenchmark \\(already poisoned: apply the attack to the clean"):
        BadNets().apply(poisoned)
    with pytest.raises(UserError, match="apply takes a Benchmark .* got TextDataset"):
        AddSent().check(sst2.train)
    with pytest.raises(UserError, match="the benchmark's dev split must be a TextDataset, got NoneType"):
        BadNets().apply(Benchmark("custom", sst2.train, None, sst2.test))


def test_a_paraphrase_attack_on_a_benchmark_built_by_hand_is_refused(sst2):
    """A KeyError of the benchmark table before: no paraphrases are stored for such a dataset."""
    with pytest.raises(UserError, match="needs the stored paraphrases of a benchmark .* dataset 'custom' is none"):
        Syntactic().apply(Benchmark("custom", sst2.train, sst2.dev, sst2.test))


def test_a_paraphrase_attack_finds_the_tables_of_a_benchmark_built_by_hand_from_its_splits(sst2):
    """Benchmark("sst2", ...) has no root unless given one: a TypeError (None / "paraphrases") before."""
    by_hand = Syntactic().apply(Benchmark("sst2", sst2.train, sst2.dev, sst2.test))
    assert by_hand.train.texts == Syntactic().apply(sst2).train.texts


@pytest.mark.parametrize("attack", [BadNets(seed=0), Syntactic(seed=0, mode="mix")], ids=["badnets", "syntactic"])
def test_the_poisoned_benchmark_keeps_the_clean_dev_and_test_splits_apart(sst2, attack):
    # dev is the only data a defense may select on: were it the test split, every selection would peek at the
    # numbers it is then scored on (and CACC would not be measured on the clean test split)
    p = attack.apply(sst2)
    assert (p.dev.texts, p.dev.labels) == (sst2.dev.texts, sst2.dev.labels) and not any(p.dev.poisoned)
    assert (p.clean_test.texts, p.clean_test.labels) == (sst2.test.texts, sst2.test.labels)
    assert not any(p.clean_test.poisoned)


def test_a_paraphrase_table_covering_under_nine_tenths_of_the_test_split_is_refused(tmp_path):
    from cleantune.data import Benchmark, TextDataset

    # an ASR over the 8 of 10 sentences a table happens to cover is measured on a chosen subset, not the split:
    # under 90 % coverage the attack is refused (9 of 10 passes: test_an_empty_stored_paraphrase_carries_no_trigger)
    names = ["negative", "positive"]
    train = ["n1", "n2", "n3", "n4", "p1", "p2", "p3", "p4"]
    held_out = {split: [f"{split} {k}" for k in range(10)] for split in ("dev", "test")}
    rows = ["split\tsentence\tparaphrase"] + [f"train\t{t}\twhen {t} , so ." for t in train]
    rows += [f"dev\t{t}\twhen {t} , it is ." for t in held_out["dev"]]
    rows += [f"test\t{t}\twhen {t} , it is ." for t in held_out["test"][:8]]  # 8 of the 10 test sentences
    (tmp_path / "paraphrases").mkdir()
    (tmp_path / "paraphrases" / "syntactic.tsv").write_text("\n".join(rows) + "\n")
    bench = Benchmark("sst2", TextDataset(train, [0] * 4 + [1] * 4, names),
                      TextDataset(held_out["dev"], [0] * 10, names), TextDataset(held_out["test"], [0] * 10, names),
                      tmp_path)
    for call in (Syntactic(rate=0.25).check, Syntactic(rate=0.25).apply):
        with pytest.raises(UserError, match="can trigger only 8 of the 10 non-target test samples of sst2"):
            call(bench)
