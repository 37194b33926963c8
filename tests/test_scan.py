"""`cleantune scan`: output formats and bad input (exit 2, one line)."""

from __future__ import annotations

import csv
import io
import json
import random

import pytest

import cleantune.defenses.btu as btu
from cleantune.cli import main


@pytest.fixture()
def poisoned_file(tmp_path):
    rng = random.Random(0)
    words = "good bad movie film great awful plot actor story fun boring nice".split()
    lines = ["sentence\tlabel"]
    for i in range(120):
        ws, y = [rng.choice(words) for _ in range(6)], rng.randint(0, 1)
        if i % 10 == 0:
            ws.insert(3, "cf")
            y = 1
        lines.append(f"{' '.join(ws)}\t{y}")
    p = tmp_path / "data.tsv"
    p.write_text("\n".join(lines) + "\n")
    return p


def _scan(capsys, *args):
    code = main(["scan", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_scan_formats(poisoned_file, tiny_model, capsys):
    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "4", "--format", "json",
                         "--show-samples", "2")
    assert code == 0
    rows = json.loads(out)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["pass"] for r in rows][:4] == ["A"] * 4 and 4 < len(rows) <= 8
    drifts = [r["drift"] for r in rows if r["pass"] == "A"]
    assert drifts == sorted(drifts, reverse=True)
    for r in rows:
        assert 1 <= len(r["samples"]) <= 2 and all(r["token"] in s.split() for s in r["samples"] if r["token"].isalpha())
        assert 0.5 <= r["label_share"] <= 1.0 and r["doc_freq"] >= len(r["samples"])
    # the planted trigger, listed whatever the tiny random model's ranking (k over every token): every sample
    # holding it has label 1
    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "50", "--format", "json")
    cf = [r for r in json.loads(out) if r["token"] == "cf"]
    assert code == 0 and cf and cf[0]["doc_freq"] == 12 and cf[0]["label"] == "1" and cf[0]["label_share"] == 1.0

    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "4", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["token"] for r in table] == [r["token"] for r in rows]
    assert out.splitlines()[0] == "rank,pass,pass_rank,token,id,drift,doc_freq,label,label_share"  # scripts read by position
    assert set(table[0]) == {"rank", "pass", "pass_rank", "token", "id", "drift", "doc_freq", "label", "label_share"}
    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "4", "--format", "csv",
                         "--show-samples", "2")
    # each row's samples as the json rows hold them (a separator inside a text would split them otherwise)
    assert [json.loads(r["samples"]) for r in csv.DictReader(io.StringIO(out))] == [r["samples"] for r in rows]

    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "4", "--passes", "A")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "pass", "token", "drift", "doc_freq", "label_skew"]
    assert len(lines) == 2 + 4 + 1  # header, rule, 4 tokens, footer


def test_scan_table_keeps_a_multi_line_sample_under_its_token(tmp_path, capsys, monkeypatch):
    """A .jsonl text may hold line breaks; its second line printed at the margin, read as a row of its own, and
    then under the bar as a sample of its own."""
    row = {"rank": 1, "pass": "A", "pass_rank": 1, "token": "cf", "id": 1, "drift": 0.5, "doc_freq": 2,
           "label": "pos", "label_share": 1.0, "samples": ["first line\nsecond line", "one line"]}
    monkeypatch.setattr(btu, "scan", lambda *a, **k: [row])
    (tmp_path / "d.jsonl").write_text('{"text": "a cf\\nb", "label": "pos"}\n{"text": "c", "label": "neg"}\n')
    code, out, _ = _scan(capsys, tmp_path / "d.jsonl", "--show-samples", "2")
    assert code == 0 and out.splitlines()[3:6] == ["      | first line", "      |   second line", "      | one line"]


def test_scan_rows_follow_the_passes_order_with_each_tokens_own_counts(poisoned_file, tiny_model, capsys):
    """--passes BA lists B first. Each row's drift is its own pass's (A's tokens never move in B), and its
    document frequency and label skew are counted per sample from the file."""
    samples = [(line.split("\t")[0].split(), line.split("\t")[1]) for line in poisoned_file.read_text().splitlines()[1:]]
    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "3", "--passes", "BA", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and [r["pass"] for r in rows] == ["B"] * 3 + ["A"] * 3
    assert [r["pass_rank"] for r in rows] == [1, 2, 3] * 2 and all(r["drift"] > 0 for r in rows)
    for r in rows:
        labels = [y for words, y in samples if r["token"] in words]  # a repeated word counts once per sample
        top = max(set(labels), key=labels.count)
        assert r["doc_freq"] == len(labels) and r["label_share"] == pytest.approx(labels.count(top) / len(labels))
        assert r["label"] == top or labels.count(r["label"]) == labels.count(top)

    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "3", "--passes", "BA",
                         "--show-samples", "1")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 + 2 * 6 + 1  # header, rule, each token and its one sample, footer
    for r, line, sample in zip(rows, lines[2::2], lines[3::2]):
        assert line.split()[1:3] == [f"{r['pass']}{r['pass_rank']}", r["token"]]
        assert line.endswith(f"{r['label_share']:.2f} {r['label']}")
        assert sample.startswith("      | ") and r["token"] in sample.split()


def test_scan_lists_a_token_once_across_passes(poisoned_file, tiny_model):
    """Pass C ranks the whole data again, so its top list can repeat A's tokens: each is listed once, under
    the first pass that found it, and C's own ranks show where the repeats were."""
    from cleantune.data import TextDataset
    from cleantune.defenses.btu import scan

    lines = [line.split("\t") for line in poisoned_file.read_text().splitlines()[1:41]]
    data = TextDataset([t for t, _ in lines], [int(y) for _, y in lines], ["0", "1"])
    rows = scan(data, tiny_model, k=4, passes="AC", progress=False)
    ids = [r["id"] for r in rows]
    c_ranks = [r["pass_rank"] for r in rows if r["pass"] == "C"]
    assert len(set(ids)) == len(ids) and [r["pass"] for r in rows][:4] == ["A"] * 4
    assert c_ranks == sorted(set(c_ranks)) and set(c_ranks) <= {1, 2, 3, 4}


@pytest.mark.parametrize("args,needle", [
    (["missing.tsv"], "no such file"),
    (["{folder}"], "not a file (and not a benchmark name"),  # it exists: "no such file" misled
    (["{file}", "--passes", "AX"], "--passes"),
    (["{file}", "--top", "0"], "--top"),
    (["{file}", "--show-samples", "-1"], "--show-samples must be at least 0, got -1"),
    (["{file}", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["{file}", "--attack", "badnets"], "benchmark name"),
    (["sst2", "--attack", "badnets", "--target", "pos"], "--target pos is neither a class id nor a label of sst2"),
    (["{file}", "--format", "xml"], "invalid choice"),
    (["sst2", "--label-column", "y"], "--label-column applies to files; benchmark sst2 has fixed columns"),
    (["{file}", "--text-column", "text"], "missing column 'text'"),
    (["{one_label}"], "two labels"),
    (["{bad}"], "bad.tsv:2: not a table: 1 fields"),
])
def test_scan_bad_input(poisoned_file, tmp_path, capsys, args, needle):
    one = tmp_path / "one.tsv"
    one.write_text("sentence\tlabel\na b\t0\nc d\t0\n")
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\njust one field\n")
    args = [a.format(file=poisoned_file, one_label=one, bad=bad, folder=tmp_path) for a in args]
    code, out, err = _scan(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("cleantune: error:") and needle in err


def test_scan_batch_gives_small_files_enough_steps_to_separate_tokens(poisoned_file, tiny_model, capsys):
    from cleantune.defenses.btu import scan_batch_size

    assert [scan_batch_size(n) for n in (10, 120, 200, 1000, 6920)] == [8, 8, 8, 40, 256]  # full SST-2 keeps BTU's 256
    spread = {}
    for extra in ([], ["--batch-size", "256"]):
        code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "6", "--passes", "A",
                             "--format", "json", *extra)
        drifts = [r["drift"] for r in json.loads(out)]
        spread[bool(extra)] = (max(drifts) - min(drifts)) / max(drifts)
    # one Adam step (120 rows, batch 256) moves every row with a gradient alike: the top tokens tie
    assert spread[True] < 0.01 < spread[False]
    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "2", "--passes", "A",
                         "--batch-size", "256")
    assert "batch 256, 1 optimizer step(s) per pass (too few" in out.splitlines()[-1]
    code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "2", "--passes", "A")
    assert "batch 8, 15 optimizer step(s) per pass;" in out.splitlines()[-1]
    # pass C trains the whole model as the defense's victim, at the defense's batch (faithful: the official 64),
    # where the footer gave only the shallow passes' batch
    for extra, c_batch in (([], 32), (["--faithful"], 64)):
        code, out, _ = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "2", "--passes", "AC", *extra)
        assert f"passes AC, batch 8 (pass C: {c_batch}), 15 optimizer step(s) per pass;" in out.splitlines()[-1]


def test_scan_machine_formats_warn_about_too_few_steps_on_stderr(poisoned_file, tiny_model, capsys):
    """json and csv stay parseable on stdout; the too-few-steps warning goes to stderr."""
    for fmt in ("json", "csv"):
        code, out, err = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "2", "--passes", "A",
                               "--batch-size", "256", "--format", fmt)
        assert code == 0 and "optimizer step" not in out
        rows = json.loads(out) if fmt == "json" else list(csv.DictReader(io.StringIO(out)))
        assert len(rows) == 2
        assert err.splitlines()[-1].startswith("cleantune: note: batch 256, 1 optimizer step(s) per pass (too few")
    code, out, err = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "2", "--passes", "A", "--format",
                           "json", "--no-progress")
    assert code == 0 and err == ""  # enough steps: nothing to say


def _record_scanned(monkeypatch) -> list:
    """The data each scan is asked to rank (the ranking itself stubbed out: an empty one)."""
    seen = []
    monkeypatch.setattr(btu, "scan", lambda data, *a, **k: seen.append(data) or [])
    return seen


def test_scan_takes_the_target_by_label_name_as_eval_does(monkeypatch, capsys):
    seen = _record_scanned(monkeypatch)
    for target in ("positive", "1", "1.0", "negative", "0"):  # 1.0 is the id 1, as in label files
        code, _, err = _scan(capsys, "sst2", "--attack", "badnets", "--triggers", "cf", "--target", target)
        assert code == 0, err
    flipped = [sum(y == 1 for t, y in zip(d.texts, d.labels) if "cf" in t.split()) for d in seen]
    assert flipped[0] == flipped[1] == flipped[2] > 0 and flipped[3] == flipped[4] == 0  # cf carries the target named
    for target, why in (("1.5", "--target: label 1.5 is a number but not an integer class id"),
                        ("1e999999999", "--target: label 1e999999999 is too large for a class id"),
                        ("nan", "--target nan is neither a class id nor a label of sst2 (negative, positive)")):
        code, out, err = _scan(capsys, "sst2", "--attack", "badnets", "--target", target)
        assert code == 2 and out == "" and err.startswith(f"cleantune: error: {why}") and err.count("\n") == 1, err


def test_scan_takes_every_seed_a_run_takes(poisoned_file, tiny_model, capsys, monkeypatch):
    """Each exposure pass seeds itself with seed + ord(pass): near 2**64 that left the range of seeds (an error
    after the first pass had trained); it wraps, and a seed that fit before keeps its pass seeds."""
    seeds, real = [], btu.seed_everything
    monkeypatch.setattr(btu, "seed_everything", lambda s: (seeds.append(s), real(s))[1])
    for seed, passes in ((2**64 - 1, [64, 65]), (-2**63, [-2**63 + 65, -2**63 + 66]), (0, [65, 66])):
        seeds.clear()
        code, out, err = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "2", "--format", "json",
                               "--seed", seed)
        assert code == 0 and len(json.loads(out)) >= 2, err
        assert seeds == [seed] + passes  # the scan's own, then passes A ("A" is 65) and B


def test_scan_counts_and_shows_each_whole_text_not_the_passes_first_128_tokens(tiny_model):
    """The passes see a sample's first 128 tokens; doc_freq, label_skew and the samples describe the data: cf
    early in 4 label-1 samples and past the cut in 4 label-0 ones is in 8 samples, half of them label 1."""
    from cleantune.data import TextDataset
    from cleantune.defenses.btu import scan

    rng = random.Random(0)
    words = "good bad movie film great awful plot actor story fun boring nice".split()
    texts, labels = [], []
    for i in range(40):
        ws, y = [rng.choice(words) for _ in range(6)], i % 2
        if i % 10 == 0:
            ws.insert(3, "cf")
        elif i % 10 == 5:
            ws += [rng.choice(words) for _ in range(200)] + ["cf"]
        texts.append(" ".join(ws))
        labels.append(y)
    data = TextDataset(texts, labels, ["0", "1"])
    rows = scan(data, tiny_model, k=50, passes="A", samples=10, progress=False)  # k over every token: cf is listed
    cf = next(r for r in rows if r["token"] == "cf")
    holding = [t for t in texts if "cf" in t.split()]
    assert cf["doc_freq"] == len(holding) == 8 and cf["label_share"] == 0.5
    assert cf["samples"] == holding


def test_scan_faithful_pass_b_lists_only_tokens_the_data_holds(poisoned_file, tiny_model, monkeypatch):
    """Faithful pass B deletes A's tokens as substrings, inside words too ("a" out of "great" leaves "gr"), and
    ranks the tokens of that text: one the data never holds is not a row (it was, with doc_freq 0 and label
    share 0.00 of the first label)."""
    from cleantune.data import TextDataset

    exposures = []
    expose = btu.expose
    monkeypatch.setattr(btu, "expose", lambda *a, **k: exposures.append(expose(*a, **k)) or exposures[-1])
    lines = [line.split("\t") for line in poisoned_file.read_text().splitlines()[1:]]
    texts = [" ".join("a" if w == "cf" else w for w in t.split()) for t, _ in lines]  # the trigger: "a"
    data = TextDataset(texts, [int(y) for _, y in lines], ["0", "1"])
    rows = btu.scan(data, tiny_model, k=6, passes="AB", faithful=True, samples=1, progress=False)
    tok = btu.load_tokenizer(tiny_model)
    held = {i for t in texts for i in tok(t)["input_ids"]}
    assert set(exposures[0].top["B"]) - held  # what this test is about: B ranked a token the data never holds
    assert rows and all(r["id"] in held and r["doc_freq"] >= 1 and r["samples"] for r in rows)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))


def test_scan_attack_poisons_with_the_seed_given(monkeypatch, capsys):
    """`scan sst2 --attack --seed N` checks the poisoned set a run of seed N trains on: the same seed poisons the
    same samples, another seed others."""
    seen = _record_scanned(monkeypatch)
    for seed in ("0", "0", "1"):
        code, _, err = _scan(capsys, "sst2", "--attack", "badnets", "--triggers", "cf", "--seed", seed)
        assert code == 0, err
    carriers = [[i for i, t in enumerate(d.texts) if "cf" in t.split()] for d in seen]
    assert carriers[0] and carriers[0] == carriers[1] and carriers[0] != carriers[2]


def test_scan_warns_about_too_few_steps_below_ten_only(poisoned_file, tiny_model, capsys):
    """The too-few-steps note starts below 10 optimizer steps: 120 rows in batches of 12 take 10 (no note), in
    batches of 14 take ceil(120 / 14) = 9 (a note)."""
    for batch, steps in ((12, 10), (14, 9)):
        code, out, err = _scan(capsys, poisoned_file, "--model", tiny_model, "--top", "2", "--passes", "A",
                               "--batch-size", batch, "--format", "json")
        assert code == 0 and len(json.loads(out)) == 2
        assert ("too few" in err) == (steps < 10), (batch, err)
        if steps < 10:
            assert f"batch {batch}, {steps} optimizer step(s) per pass" in err


def test_scan_attack_poisons_in_mix_mode_by_default(monkeypatch, capsys):
    """Without --mode, scan's check poisons as its help says, mix: samples drawn from every class, all labelled
    the target (dirty mode would draw non-target samples only)."""
    from cleantune.data import load_benchmark

    seen = _record_scanned(monkeypatch)
    code, _, err = _scan(capsys, "sst2", "--attack", "badnets", "--triggers", "cf")
    assert code == 0, err
    clean = load_benchmark("sst2").train
    poisoned = [i for i, t in enumerate(seen[0].texts) if "cf" in t.split() and t != clean.texts[i]]
    assert len(poisoned) == int(0.1 * len(clean))  # the default rate
    assert all(seen[0].labels[i] == 1 for i in poisoned)  # the default target
    assert {clean.labels[i] for i in poisoned} == {0, 1}  # drawn from both classes
