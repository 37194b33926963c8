"""The report: mean ± std over seeds, the drop against fine-tuning, self-contained HTML with its plots."""

from __future__ import annotations

import base64
import fnmatch
import re

import pytest

from cleantune.cli import main
from cleantune.runner import RunConfig
from cleantune.store import ResultStore, config_hash


def put_run(store: ResultStore, cacc: float, asr: float, wall: float, status: str = "ok", metrics: dict | None = None,
            timings: dict | None = None, **config) -> None:
    resolved = RunConfig(**config).resolve()  # a real stored config: every key the report reads
    m = {"cacc": cacc, "asr": asr, **(metrics or {})} if status == "ok" else {}
    store.put(config_hash(resolved), resolved, m, {"wall_s": wall, **(timings or {})}, {"device": "cpu", "cpu_threads": 2},
              status=status, error=None if status == "ok" else "RuntimeError: out of memory\nTraceback ...")


@pytest.fixture
def store(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    for seed, (ft, lo) in enumerate([((0.90, 0.99, 10.0), (0.88, 0.20, 5.0)), ((0.92, 1.00, 10.0), (0.86, 0.30, 5.0))]):
        put_run(s, *ft, dataset="sst2", attack="badnets", defense="finetune", seed=seed)
        put_run(s, *lo, dataset="sst2", attack="badnets", defense="lora", seed=seed)
    put_run(s, 0.95, 0.90, 20.0, dataset="hsol", attack="addsent", defense="finetune", mode="mix")
    put_run(s, 0.90, 0.50, 30.0, dataset="hsol", attack="addsent", defense="lora", mode="mix",
            metrics={"frequency": {"steps": [0, 5, 10], "clean": {"low": [1.0, 0.6, 0.3]}, "poison": {"low": [1.0, 0.2, 0.1]}}})
    put_run(s, 0, 0, 1.0, status="failed", dataset="hsol", attack="addsent", defense="lora", mode="mix", seed=7)
    return s


def test_report_tables_plots_and_protocol(store, tmp_path):
    assert main(["report", "--store", str(store.path), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    md = (tmp_path / "rep" / "report.md").read_text()
    # sst2: mean ± sample std over the two seeds; lora loses 4 points of CACC and takes half the time
    assert "| finetune | 2 | 0.910 ± 0.014 | 0.995 ± 0.007 | – | +0.0 ± 0.0 pt | 1.00× |" in md
    # ΔCACC paired by seed: 0.90 - 0.88 and 0.92 - 0.86, mean 4.0, sample std 2.8 points
    assert "| lora | 2 | 0.870 ± 0.014 | 0.250 ± 0.071 | – | +4.0 ± 2.8 pt | 0.50× |" in md
    assert "| lora | 1 | 0.900 | 0.500 | – | +5.0 pt | 1.50× |" in md  # hsol, one seed: no ±
    for text in ("0.870 ± 0.014", "+4.0 ± 2.8 pt", "0.50×"):
        assert text in page
    # plots: a bar chart per dataset, the scatter, the recorded frequency curves; all embedded PNGs
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "Frequency analysis" in page and "plots/asr_vs_cacc.png" in md
    plots = [f.name for f in (tmp_path / "rep" / "plots").glob("*.png")]
    assert len(plots) == 4
    # a re-run removes only the report's own stale plots, by these patterns: each plot it writes must match one
    from cleantune.report import PLOT_NAMES

    assert all(any(fnmatch.fnmatch(p, f) for f in PLOT_NAMES) for p in plots), plots
    # self-contained: nothing is fetched
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page) and "http" not in page
    assert "<link" not in page and "<script" not in page
    # protocol: poison settings per attack, the clean-data budget, the selection rule, the hsol caveat
    assert "attack badnets</dt><dd>poison rate 0.1; mode dirty; target label 1" in page
    assert "attack addsent</dt><dd>poison rate 0.1; mode mix" in page
    assert "clean-data budget: clean dev: model selection only" in page
    assert "clean dev split" in page and "dev and test hold the same 2,485 samples" in page
    assert "RuntimeError: out of memory" in page  # the failed run is listed with its error


def test_results_and_report_select_runs_by_the_axes_of_run(store, tmp_path, capsys):
    """--dataset/--attack/--defense/--model/--seed/--status (comma lists) pick runs; a value no stored run has is
    refused by name, not printed as an empty table; filters that exclude each other do print one."""
    import json

    def ids(*args):
        assert main(["results", "--store", str(store.path), "--format", "json", *args]) == 0
        return sorted((r["config"]["dataset"], r["config"]["defense"], r["config"]["seed"], r["status"])
                      for r in json.loads(capsys.readouterr().out))

    assert ids("--dataset", "sst2", "--defense", "lora") == [("sst2", "lora", 0, "ok"), ("sst2", "lora", 1, "ok")]
    assert ids("--seed", "1,7") == [("hsol", "lora", 7, "failed"), ("sst2", "finetune", 1, "ok"), ("sst2", "lora", 1, "ok")]
    assert ids("--status", "failed") == [("hsol", "lora", 7, "failed")]
    assert ids("--attack", "addsent", "--model", "minilm", "--status", "ok") == [("hsol", "finetune", 0, "ok"),
                                                                                 ("hsol", "lora", 0, "ok")]
    assert ids("--dataset", "sst2", "--seed", "7") == []
    # a status is known in advance: "which runs failed?" on runs that all succeeded is an empty answer
    assert ids("--dataset", "sst2", "--status", "failed") == []
    ok_only = ResultStore(tmp_path / "ok.sqlite")
    put_run(ok_only, 0.8, 0.1, 5.0)
    assert main(["results", "--store", str(ok_only.path), "--status", "failed", "--format", "json"]) == 0
    assert capsys.readouterr().out == "[]\n"
    for args, msg in ((["--defense", "lora,musle-lora"], f"--defense musle-lora: no run in {store.path} has it "
                        "(they have: finetune, lora)"),
                      (["--status", "ok,faild"], "--status faild: not a run status (ok, failed)"),
                      (["--seed", "one"], "--seed: expected an integer, got 'one'")):
        for command in (["results"], ["report", "--out", str(tmp_path / "rep")]):
            assert main([*command, "--store", str(store.path), *args]) == 2
            assert capsys.readouterr().err == f"cleantune: error: {msg}\n"
            assert not (tmp_path / "rep").exists()
    assert main(["report", "--store", str(store.path), "--out", str(tmp_path / "rep"), "--dataset", "hsol"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| lora | 1 | 0.900 | 0.500 | – | +5.0 pt | 1.50× |" in md and "sst2" not in md


def test_report_without_frequency_or_reference_degrades_gracefully(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.8, 0.1, 5.0, dataset="sst2", attack="syntactic", defense="lora")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| lora | 1 | 0.800 | 0.100 | – | – | – |" in md and "Frequency" not in md
    assert "dev and test hold the same" not in md  # the hsol caveat only where hsol was run


def test_report_writes_only_into_an_empty_folder_or_its_own(tmp_path, capsys):
    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.8, 0.1, 5.0, dataset="sst2", attack="badnets", defense="lora")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "notes")]) == 2
    assert "not a cleantune report; not writing into it" in capsys.readouterr().err
    assert [f.name for f in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    for _ in range(2):  # its own earlier report is replaced
        assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    plots = sorted(f.name for f in (tmp_path / "rep" / "plots").iterdir())
    put_run(s, 0.7, 0.2, 5.0, dataset="hsol", attack="badnets", defense="lora")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    assert len(list((tmp_path / "rep" / "plots").iterdir())) > len(plots)  # hsol's plots come along
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep"), "--dataset", "sst2"]) == 0
    assert sorted(f.name for f in (tmp_path / "rep" / "plots").iterdir()) == plots  # and go: no stale plot stays


def test_a_report_that_cannot_be_written_in_full_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """A full disk while writing left a traceback and a folder with plots but no report.md, which the next report
    then refused as not its own; into an earlier report's folder it left a cut report.html beside the old
    report.md and the new plots. Now the earlier report stays whole, and a user's own files there stay too."""
    import errno
    from pathlib import Path

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.8, 0.1, 5.0, dataset="sst2", attack="badnets", defense="lora")
    write_bytes = Path.write_bytes

    def full_disk(self, *args, **kwargs):
        if self.name == ".report.md.partial":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, *args, **kwargs)

    rep = tmp_path / "rep"
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert main(["report", "--store", str(s.path), "--out", str(rep / "deeper")]) == 2
    assert capsys.readouterr().err == (f"cleantune: error: --out {rep / 'deeper'}: cannot write the report "
                                       "(No space left on device)\n")
    assert not rep.exists()
    monkeypatch.undo()
    assert main(["report", "--store", str(s.path), "--out", str(rep)]) == 0
    (rep / "plots" / "my_figure.png").write_bytes(b"mine")
    (rep / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    put_run(s, 0.7, 0.2, 5.0, dataset="olid", attack="badnets", defense="lora")
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert main(["report", "--store", str(s.path), "--out", str(rep)]) == 2
    capsys.readouterr()
    assert {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()} == before  # no bars_olid.png, no .partial
    monkeypatch.undo()
    assert main(["report", "--store", str(s.path), "--out", str(rep)]) == 0
    assert (rep / "plots" / "bars_olid.png").is_file() and "olid" in (rep / "report.md").read_text()
    # a user's PNG named like a report's (a copied `analyze frequency` curve) is the user's too: only the plots
    # the earlier report.md linked are the report's to remove
    (rep / "plots" / "frequency_delta2.00.png").write_bytes(b"mine")
    (rep / "plots" / "bars_mydata.png").write_bytes(b"mine")
    assert main(["report", "--store", str(s.path), "--out", str(rep), "--dataset", "olid"]) == 0
    plots = sorted(p.name for p in (rep / "plots").iterdir())
    assert "bars_sst2.png" not in plots and "my_figure.png" in plots  # the stale plot goes, the user's stays
    assert (rep / "plots" / "frequency_delta2.00.png").read_bytes() == (rep / "plots" / "bars_mydata.png").read_bytes() == b"mine"
    assert (rep / "notes.txt").read_text() == "mine"
    killed = tmp_path / "killed"  # a kill (no clean-up) cut the first write into a new folder short
    killed.mkdir()
    (killed / ".report.html.partial").write_bytes(b"<html>cut")
    assert main(["report", "--store", str(s.path), "--out", str(killed)]) == 0
    assert sorted(p.name for p in killed.iterdir()) == ["plots", "report.html", "report.md"]


def test_report_missing_store_is_a_user_error(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "nope.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_report_plots_curves_files_of_the_frequency_analysis(tmp_path, capsys):
    import json

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.8, 0.1, 5.0, dataset="sst2", attack="badnets", defense="finetune")
    rec = lambda step, lo: {"step": step, "epoch": 0, "clean": {"e_low": [lo, lo / 2], "e_high": [0.9, 0.8]},
                            "poison": {"e_low": [lo / 3, lo / 4], "e_high": [0.5, 0.4]}}
    curves = tmp_path / "curves.json"
    curves.write_text(json.dumps({"deltas": [2.0, 8.0], "records": [rec(0, 1.0), rec(5, 0.5)],
                                  "config": {"dataset": "sst2", "attack": "badnets", "defense": "finetune", "seed": 0}}))
    out = tmp_path / "rep"
    assert main(["report", "--store", str(s.path), "--out", str(out), "--frequency", str(curves)]) == 0
    page = (out / "report.html").read_text()
    assert "frequency curves: sst2 badnets finetune seed 0" in page
    assert len(re.findall(r"data:image/png;base64,", page)) == 3  # bars, scatter, the curves
    # a one-target set's e_high is over mean ||Y|| (the 0/0 fix): its curves say so, as analyze frequency's PNGs do
    from cleantune.report import parse_frequency

    tagged = json.loads(curves.read_text())
    for r in tagged["records"]:
        r["poison"]["e_high_denominator"], r["clean"]["e_high_denominator"] = "target", "high part of target"
    labels = list(parse_frequency(tagged)["curves"])
    assert [x for x in labels if "mean ||Y||" in x] == ["poison e_high (δ=2), / mean ||Y||",
                                                        "poison e_high (δ=8), / mean ||Y||"]
    bad = tmp_path / "bad.json"
    # each of the last five raised a traceback: past json's recursion limit, an integer too large for a float,
    # and steps that are not numbers (matplotlib's TypeError or numpy's ValueError)
    for text in (json.dumps({"records": "none"}), json.dumps({"deltas": 2.0, "records": [rec(0, 1.0)]}),
                 "[" * 100_000, '{"a": [1, 1' + "0" * 400 + "]}",
                 json.dumps({"deltas": [2.0], "records": [{**rec(0, 1.0), "step": "x"}, {**rec(5, 1.0), "step": None}]}),
                 json.dumps({"deltas": [2.0], "records": [{**rec(0, 1.0), "step": [1]}, {**rec(5, 1.0), "step": {}}]}),
                 json.dumps({"deltas": [2.0], "records": [rec(0, 1.0)] * 2}).replace("0.9", "1" + "0" * 400)):
        bad.write_text(text)
        assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "r2"), "--frequency", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "no frequency curves" in err and err.count("\n") == 1 and not (tmp_path / "r2").exists()
    bad.write_text(json.dumps({"steps": ["x", {}], "a": [1, 2]}))  # steps of no use: the curve by its index
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "r3"), "--frequency", str(bad)]) == 0


def test_mixed_precision_runs_are_their_own_rows_and_compare_at_their_precision(tmp_path, monkeypatch, capsys):
    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.90, 1.00, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision` sets
    put_run(s, 0.88, 1.00, 4.0, dataset="sst2", attack="badnets", defense="finetune")
    put_run(s, 0.85, 0.20, 2.0, dataset="sst2", attack="badnets", defense="lora")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| finetune | 1 | 0.900 | 1.000 | – | +0.0 pt | 1.00× |" in md  # not averaged with the bf16 run
    assert "| lora [bf16] | 1 | 0.850 | 0.200 | – | +3.0 pt | 0.50× |" in md  # against bf16 fine-tuning
    assert "Precision: bf16 mixed precision, fp32" in md
    capsys.readouterr()
    assert main(["results", "--store", str(s.path), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert "mixed_precision" in rows[0].split(",") and sum(",bf16," in r for r in rows) == 2


def md_rows(md: str, defense: str) -> dict[str, list[str]]:
    """label -> the other cells of that defense's Markdown rows."""
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("| ") and cells[0].split(" ")[0] == defense:
            out[cells[0]] = cells[1:]
    return out


def test_backbones_whose_folders_share_a_name_are_separate_rows(tmp_path, tiny_model):
    import shutil

    s = ResultStore(tmp_path / "s.sqlite")
    paths = []
    for parent, cacc in (("a", 0.9), ("b", 0.7)):
        path = tmp_path / parent / "model"
        shutil.copytree(tiny_model, path)  # a run's config is resolved against the backbone's config and tokenizer
        paths.append(str(path))
        put_run(s, cacc, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", model=str(path))
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = md_rows(md, "finetune")
    assert len(rows) == 2 and all(cells[0] == "1" for cells in rows.values())  # one seed each, not 2 seeds of one
    for path, label in zip(paths, sorted(rows)):
        assert "/".join(path.split("/")[-2:]) in label  # the folder above tells them apart
    assert sorted(cells[1] for cells in rows.values()) == ["0.700", "0.900"]


def test_defense_is_compared_only_with_fine_tuning_on_the_same_cell(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    # two sweeps into one store: fine-tuning on 300 samples, LoRA on 200
    put_run(s, 0.90, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", train_size=300)
    put_run(s, 0.80, 0.2, 5.0, dataset="sst2", attack="badnets", defense="lora", train_size=200, epochs=5)
    # hsol: fine-tuning over seeds 0 and 1, LoRA over seed 0 only
    for seed in (0, 1):
        put_run(s, 0.9, 1.0, 10.0, dataset="hsol", attack="badnets", defense="finetune", seed=seed)
    put_run(s, 0.8, 0.2, 5.0, dataset="hsol", attack="badnets", defense="lora")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    # sst2 mixes train sizes: every row carries its own, LoRA's too, though LoRA ran only one
    assert "| lora (train_size=200) | 1 | 0.800 | 0.200 | – | – | – |" in md
    assert "| finetune (train_size=300) | 1 | 0.900 | 1.000 | – | +0.0 pt | 1.00× |" in md
    # hsol: one train size, no label; compared on the one seed both ran
    assert "| lora | 1 | 0.800 | 0.200 | – | +10.0 pt | 0.50× |" in md
    # fine-tuning on LoRA's 200 samples is its reference, though LoRA trains for its own number of epochs
    ft, lora, ft_wall, lora_wall = 0.85, 0.80, 8.0, 5.0
    put_run(s, ft, 1.0, ft_wall, dataset="sst2", attack="badnets", defense="finetune", train_size=200)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep2")]) == 0
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert f"| lora (train_size=200) | 1 | 0.800 | 0.200 | – | {100 * (ft - lora):+.1f} pt | {lora_wall / ft_wall:.2f}× |" in md


def test_a_bar_in_a_label_stays_inside_its_markdown_cell(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    for sentence in ("watch this | movie", "plain words"):
        put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="addsent", defense="finetune", sentence=sentence)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    columns = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
    assert len(table) == 4 and len(columns) == 1  # header, rule, two rows: as many columns in each
    assert "watch this \\| movie" in md


def test_a_backslash_or_carriage_return_in_a_label_stays_text_in_its_markdown_row(tmp_path):
    r"""A '\r' ended the row (Markdown breaks lines there as at '\n'); a backslash before a '|' took that '|''s
    escape and one before other punctuation vanished, so 'a\|b' read as 'a|b', another sentence's label."""
    from cleantune.report import build

    s = ResultStore(tmp_path / "s.sqlite")
    sentences = ("a\\|b", "a|b", "line\rbreak", "ends in \\")
    for sentence in sentences:
        put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="addsent", defense="finetune", sentence=sentence)
    _, md, _ = build(s.runs())

    def first_cell(row: str) -> str:  # as GitHub reads a table row: split at the unescaped '|', then unescape
        cell = re.split(r"(?<!\\)\|", row)[1].replace("\\|", "|")
        return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", cell).strip()

    labels = [first_cell(row) for row in md.split("\n") if row.startswith("| finetune")]
    assert sorted(labels) == sorted(f"finetune (sentence={t.replace(chr(13), ' ')})" for t in sentences)


def test_an_empty_store_gives_a_short_report_without_protocol(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "no runs" in md and "Protocol" not in md
    put_run(s, 0, 0, 1.0, status="failed", dataset="sst2", attack="badnets", defense="lora")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep2")]) == 0
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert "No successful runs" in md and "Protocol" not in md and "RuntimeError: out of memory" in md


def test_fine_tuning_leads_the_table_and_the_protocol_is_per_defense(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    for seed in (0, 1):  # equal numbers over two seeds: still two seeds, so the ± is shown
        put_run(s, 0.90, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", seed=seed, epochs=2)
        put_run(s, 0.80, 0.2, 10.0, dataset="sst2", attack="badnets", defense="abl", seed=seed, epochs=4)
        put_run(s, 0.85, 0.1, 10.0, dataset="sst2", attack="badnets", defense="lora", seed=seed, epochs=5)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in md.splitlines() if line.startswith("| ") and "defense" not in line]
    assert rows == ["finetune", "abl", "lora"]  # the baseline first, whatever its name sorts as
    assert "| finetune | 2 | 0.900 ± 0.000 | 1.000 ± 0.000 | – | +0.0 ± 0.0 pt | 1.00× |" in md
    # each defense's own training budget, not the union over the store
    protocol = {line.split("**")[1]: line for line in md.splitlines() if line.startswith("- **defense ")}
    assert "; epochs 2; " in protocol["defense finetune"] and "; epochs 5; " in protocol["defense lora"]


def test_analysis_curves_are_read_at_the_smallest_and_largest_delta():
    from cleantune.report import parse_frequency

    rec = lambda step: {"step": step, "epoch": 0, "clean": {"e_low": [1.0 + step, 2.0, 3.0 + step], "e_high": [4.0, 5.0, 6.0]}}
    f = parse_frequency({"deltas": [2.0, 5.0, 8.0], "records": [rec(0), rec(5)]})
    assert f["steps"] == [0, 5]
    assert f["curves"] == {"clean e_low (δ=2)": [1.0, 6.0], "clean e_low (δ=8)": [3.0, 8.0],
                           "clean e_high (δ=2)": [4.0, 4.0], "clean e_high (δ=8)": [6.0, 6.0]}


def test_asr_is_shown_with_its_floor_in_the_table_and_the_plots(tmp_path):
    from cleantune.report import build

    s = ResultStore(tmp_path / "s.sqlite")
    for seed, floor in ((0, 0.70), (1, 0.80)):  # the floor is averaged over seeds as ASR is
        put_run(s, 0.54, 0.54, 10.0, dataset="sst2", attack="badnets", defense="muscle-lora", seed=seed,
                metrics={"asr_floor": floor})
    put_run(s, 0.50, 1.00, 10.0, dataset="sst2", attack="badnets", defense="finetune", metrics={"asr_floor": 1.0})
    put_run(s, 0.90, 0.20, 10.0, dataset="sst2", attack="badnets", defense="lora")  # stored before the floor
    put_run(s, 0.80, 0.30, 10.0, dataset="sst2", attack="badnets", defense="abl", seed=0, metrics={"asr_floor": 0.1})
    put_run(s, 0.80, 0.30, 10.0, dataset="sst2", attack="badnets", defense="abl", seed=1)  # one seed without it
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    page = (tmp_path / "rep" / "report.html").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| defense"))
    assert "| badnets ASR | badnets ASR floor |" in header and "<th colspan='5'>badnets</th>" in page and "<th>ASR</th><th>ASR floor</th>" in page
    assert md_rows(md, "muscle-lora")["muscle-lora"][1:4] == ["0.540 ± 0.000", "0.540 ± 0.000", "0.750 ± 0.071"]
    assert md_rows(md, "finetune")["finetune"][2:4] == ["1.000", "1.000"]
    assert md_rows(md, "lora")["lora"][2:4] == ["0.200", "–"]  # an old run still renders
    assert md_rows(md, "abl")["abl"][3] == "–"  # no floor over a part of the seeds
    assert "ASR floor" in md.split("## sst2")[0]  # the intro says what it is

    # the plots mark the floor: the same runs without it draw other pictures
    runs = s.runs()
    bare = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "asr_floor"}} for r in runs]
    with_floor, without = build(runs)[2], build(bare)[2]
    assert with_floor["bars_sst2.png"] != without["bars_sst2.png"]
    assert with_floor["asr_vs_cacc.png"] != without["asr_vs_cacc.png"]
    assert build(bare)[2]["bars_sst2.png"] == without["bars_sst2.png"]  # the comparison means something


def test_protocol_prints_the_training_settings_the_runs_used(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    # muscle-lora's config holds lr None ("the defense's default"); the lr it trained with is resolved per
    # backbone and stored in its metrics, as runner._run stores the defense's extra_metrics_
    put_run(s, 0.54, 0.54, 10.0, dataset="sst2", attack="badnets", defense="muscle-lora", epochs=1,
            metrics={"resolved_settings": {"lr": 0.001, "lora_r": 8, "scales": [1, 4, 8]}})
    put_run(s, 0.54, 0.54, 10.0, dataset="sst2", attack="addsent", defense="muscle-lora", epochs=1)  # an older run
    put_run(s, 0.90, 1.00, 10.0, dataset="sst2", attack="badnets", defense="finetune", epochs=2, lr=3e-4)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    protocol = {line.split("**")[1]: line for line in md.splitlines() if line.startswith("- **defense ")}
    assert protocol["defense muscle-lora"].endswith("; epochs 1; lr 0.001, default (not recorded)")
    assert protocol["defense finetune"].endswith("; epochs 2; lr 0.0003")
    assert "None" not in "".join(protocol.values())


def test_a_cell_setting_that_differs_in_a_table_labels_every_row(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    # fine-tuning on 200 and 600 samples; the defenses on 200 only
    put_run(s, 0.80, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", train_size=200)
    put_run(s, 0.90, 1.0, 20.0, dataset="sst2", attack="badnets", defense="finetune", train_size=600)
    put_run(s, 0.70, 0.2, 30.0, dataset="sst2", attack="badnets", defense="btu", train_size=200)
    for lr in (1e-4, 5e-4):  # LoRA's own lr axis labels LoRA's rows only
        put_run(s, 0.75, 0.3, 5.0, dataset="sst2", attack="badnets", defense="lora", train_size=200, lr=lr)
    # an attack's setting counts in its own column: AddSent at another rate than BadNets labels no row
    put_run(s, 0.85, 1.0, 10.0, dataset="sst2", attack="addsent", defense="finetune", train_size=200, rate=0.2)
    put_run(s, 0.80, 0.5, 10.0, dataset="hsol", attack="badnets", defense="lora", train_size=200)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    sst2 = md.split("## sst2")[1].split("## ASR")[0]
    assert sorted(md_rows(sst2, "finetune")) == ["finetune (train_size=200)", "finetune (train_size=600)"]
    assert list(md_rows(sst2, "btu")) == ["btu (train_size=200)"]
    assert sorted(md_rows(sst2, "lora")) == ["lora (lr=0.0001, train_size=200)", "lora (lr=0.0005, train_size=200)"]
    # ΔCACC against fine-tuning on its own 200 samples, as its label says; one fine-tuning row per train
    # size across the attacks (badnets and addsent in the 200-sample row)
    assert md_rows(sst2, "btu")["btu (train_size=200)"][4:6] == ["+10.0 pt", "3.00×"]
    assert md_rows(sst2, "finetune")["finetune (train_size=200)"][1] == "0.800"
    assert md_rows(sst2, "finetune")["finetune (train_size=200)"][6] == "0.850"
    assert list(md_rows(md.split("## hsol")[1].split("## sst2")[0], "lora")) == ["lora"]  # hsol: one train size, no label


def test_each_variant_is_compared_with_fine_tuning_at_the_same_setting(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    for lr, ft, lora, ft_wall in ((1e-4, 0.90, 0.85, 10.0), (5e-4, 0.80, 0.78, 20.0)):  # an lr axis for both
        put_run(s, ft, 1.0, ft_wall, dataset="sst2", attack="badnets", defense="finetune", lr=lr)
        put_run(s, lora, 0.2, 5.0, dataset="sst2", attack="badnets", defense="lora", lr=lr)
    put_run(s, 0.9, 1.0, 0.0, dataset="hsol", attack="badnets", defense="finetune")  # a wall time of 0: no ratio
    put_run(s, 0.8, 0.2, 5.0, dataset="hsol", attack="badnets", defense="lora")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = md_rows(md.split("## sst2")[1].split("## ASR")[0], "lora")
    assert rows["lora (lr=0.0001)"][4:6] == ["+5.0 pt", "0.50×"] and rows["lora (lr=0.0005)"][4:6] == ["+2.0 pt", "0.25×"]
    assert md_rows(md.split("## hsol")[1].split("## sst2")[0], "lora")["lora"][4:6] == ["+10.0 pt", "–"]


def test_time_ratio_leaves_out_btus_reporting_only_stage_evaluations(tmp_path):
    from cleantune.report import summarize

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.90, 1.00, 100.0, dataset="sst2", attack="badnets", defense="finetune")
    put_run(s, 0.89, 0.12, 190.0, dataset="sst2", attack="badnets", defense="btu", timings={"stage_eval_s": 40.0})
    cell = summarize(s.runs())["sst2"]["cells"][("btu", "badnets")]
    assert cell["time_rel"] == pytest.approx(1.5)  # (190 - 40) / 100
    # a null one (the store takes a null for any timing) is none spent, not a TypeError
    put_run(s, 0.89, 0.12, 190.0, dataset="hsol", attack="badnets", defense="btu", timings={"stage_eval_s": None})
    put_run(s, 0.90, 1.00, 100.0, dataset="hsol", attack="badnets", defense="finetune")
    assert summarize(s.runs())["hsol"]["cells"][("btu", "badnets")]["time_rel"] == pytest.approx(1.9)


def test_a_seed_stored_again_under_other_versions_counts_once_the_newest(tmp_path):
    from cleantune.report import summarize

    s = ResultStore(tmp_path / "s.sqlite")

    def put(cacc, seed, transformers=None):
        resolved = RunConfig(dataset="sst2", defense="finetune", seed=seed).resolve()
        if transformers:  # an upgrade changes every run id: the sweep stores each cell again
            resolved["versions"] = {**resolved["versions"], "transformers": transformers}
        s.put(config_hash(resolved), resolved, {"cacc": cacc, "asr": 1.0}, {"wall_s": 10.0}, {"device": "cpu"})

    put(0.90, 0)
    put(0.92, 1)
    put(0.80, 0, transformers="9.9.9")
    cell = summarize(s.runs())["sst2"]["cells"][("finetune", "badnets")]
    assert cell["n"] == 2 and cell["cacc"][0] == pytest.approx((0.80 + 0.92) / 2)


def test_a_dollar_in_a_user_setting_prints_as_itself_in_the_plots(tmp_path):
    from cleantune.report import build

    s = ResultStore(tmp_path / "s.sqlite")
    for sentence in ("I paid $10 for this, 100% worth the $", "plain"):  # two values: the rows are labelled by it
        put_run(s, 0.9, 0.5, 10.0, dataset="sst2", attack="addsent", defense="finetune", sentence=sentence)
    page, md, images = build(s.runs())  # mathtext could not parse this label and raised
    assert "I paid $10" in md and images["bars_sst2.png"][:4] == b"\x89PNG"


def test_seed_counts_of_a_row_are_listed_in_numeric_order():
    from cleantune.report import table_rows

    def cell(n):
        return {"n": n, "cacc": (0.5, 0.0, n), "asr": (0.5, 0.0, n), "asr_floor": (0.1, 0.0, n), "cacc_drop": None,
                "time_rel": None}

    d = {"attacks": ["badnets", "addsent"], "rows": ["finetune"],
         "cells": {("finetune", "badnets"): cell(10), ("finetune", "addsent"): cell(2)}}
    assert table_rows(d)[1][0][:2] == ["finetune", "2/10"]


def test_user_text_in_the_markdown_stays_text(tmp_path):
    from cleantune.report import build

    s = ResultStore(tmp_path / "s.sqlite")
    sentence = "<img src=x onerror=alert(1)> a | b"
    put_run(s, 0.9, 0.5, 10.0, dataset="sst2", attack="addsent", defense="finetune", sentence=sentence)
    _, md, _ = build(s.runs())
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt; a \\| b" in md


def test_a_defense_filter_keeps_fine_tuning_as_the_baseline_and_an_empty_filter_is_refused(store, tmp_path, capsys):
    """`--defense lora` alone left every ΔCACC and time× as –: fine-tuning's runs under the other filters come
    along as the reference rows, and the report says so; `--defense ''` read as an empty store."""
    assert main(["report", "--store", str(store.path), "--out", str(tmp_path / "rep"), "--defense", "lora",
                 "--dataset", "sst2"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| lora | 2 | 0.870 ± 0.014 | 0.250 ± 0.071 | – | +4.0 ± 2.8 pt | 0.50× |" in md
    assert "4 selected runs: 4 ok, 0 failed" in md
    assert "Selection: dataset sst2; defense lora (and finetune, the baseline of ΔCACC and time×)." in md
    assert main(["report", "--store", str(store.path), "--out", str(tmp_path / "rep2"), "--defense", "lora",
                 "--status", "failed"]) == 0  # failed runs only: no baseline to add
    assert "finetune" not in (tmp_path / "rep2" / "report.md").read_text().split("## Failed runs")[0]
    for command in (["results"], ["report", "--out", str(tmp_path / "rep3")]):
        assert main([*command, "--store", str(store.path), "--defense", ","]) == 2
        assert capsys.readouterr().err == "cleantune: error: --defense lists no value\n"
        assert main([*command, "--store", str(store.path), "--defense", "finetune,,lora"]) == 2  # it was dropped
        assert capsys.readouterr().err == "cleantune: error: --defense finetune,,lora: an empty item in the comma list\n"


def test_the_baseline_stays_where_fine_tuning_lacks_one_of_the_selected_values(store, tmp_path):
    """Fine-tuning has no seed 7 (LoRA's failed run has): that dropped fine-tuning's seed 0 too, and every ΔCACC
    and time× read –."""
    assert main(["report", "--store", str(store.path), "--out", str(tmp_path / "rep"), "--defense", "lora",
                 "--seed", "0,7"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| lora | 1 | 0.880 | 0.200 | – | +2.0 pt | 0.50× |" in md  # sst2: 0.90 - 0.88
    assert "| lora | 1 | 0.900 | 0.500 | – | +5.0 pt | 1.50× |" in md  # hsol: 0.95 - 0.90
    assert "defense lora; seed 0, 7 (and finetune, the baseline of ΔCACC and time×)" in md


def test_a_cell_with_fewer_seeds_or_a_one_class_model_is_marked(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    for seed in (0, 1):
        put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", seed=seed)
        put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="addsent", defense="finetune", seed=seed)
    put_run(s, 0.5, 1.0, 10.0, dataset="sst2", attack="addsent", defense="finetune", seed=2,
            metrics={"predicted_classes": 1})
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| finetune | 2/3 | 0.900 ± 0.000 (n=2) | 1.000 ± 0.000 | – | +0.0 ± 0.0 pt | 1.00× | 0.767 ± 0.231 (n=3) †" in md
    assert "† a seed of this cell predicts one class for every clean test sample" in md
    assert "5 stored runs: 5 ok, 0 failed" in md


def test_the_scatter_shares_one_cacc_axis_at_least_ten_points_wide(tmp_path):
    from cleantune.report import cacc_axis, summarize

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.4981, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    put_run(s, 0.4992, 1.0, 10.0, dataset="sst2", attack="badnets", defense="lora")
    lo, hi = cacc_axis(summarize(s.runs()))
    assert hi - lo == pytest.approx(0.1) and lo < 0.4981 and hi > 0.4992  # not a 0.1-point-wide axis
    put_run(s, 0.95, 0.1, 10.0, dataset="hsol", attack="addsent", defense="lora")  # another panel, same axis
    lo, hi = cacc_axis(summarize(s.runs()))
    assert lo == pytest.approx(0.4981 - 0.02) and hi == pytest.approx(0.95 + 0.02)


def test_a_failed_seed_costs_that_seed_of_the_comparison_not_all_of_it(tmp_path):
    """ΔCACC and time× pair runs by seed: a seed one side lacks is left out of the comparison (n= says how many
    were compared), where a seed-set mismatch used to blank the whole comparison."""
    s = ResultStore(tmp_path / "s.sqlite")
    for seed, (ft, lora) in enumerate([(0.90, 0.85), (0.92, 0.84), (0.91, 0.80)]):
        put_run(s, ft, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", seed=seed)
        if seed < 2:  # seed 2 of fine-tuning ran; LoRA's seed 2 failed
            put_run(s, lora, 0.2, 5.0, dataset="sst2", attack="badnets", defense="lora", seed=seed)
    put_run(s, 0, 0, 1.0, status="failed", dataset="sst2", attack="badnets", defense="lora", seed=2)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    # LoRA's two seeds against fine-tuning's same two: differences 0.05 and 0.08
    assert "| lora | 2 | 0.845 ± 0.007 | 0.200 ± 0.000 | – | +6.5 ± 2.1 pt | 0.50× |" in md
    # fine-tuning against itself over its three seeds
    assert "| finetune | 3 | 0.910 ± 0.010 | 1.000 ± 0.000 | – | +0.0 ± 0.0 pt | 1.00× |" in md
    put_run(s, 0.70, 0.2, 5.0, dataset="sst2", attack="badnets", defense="lora", seed=3)  # fine-tuning has no seed 3
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| lora | 3 | 0.797 ± 0.084 | 0.200 ± 0.000 | – | +6.5 ± 2.1 pt (n=2) | 0.50× |" in md


def test_what_a_defense_flagged_is_reported_against_the_ground_truth(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    for seed, recall in ((0, 0.8), (1, 0.6)):
        put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", seed=seed)
        put_run(s, 0.85, 0.3, 20.0, dataset="sst2", attack="badnets", defense="strip", seed=seed,
                metrics={"test_detection": {"precision": 0.5, "recall": recall, "frr": 0.1, "far": 1 - recall}})
        put_run(s, 0.88, 0.1, 15.0, dataset="sst2", attack="badnets", defense="btu", seed=seed,
                metrics={"btu_token_precision": 0.25, "btu_token_recall": 1.0})
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| sst2 | strip | badnets | 2 | test inputs rejected | 0.500 ± 0.000 | 0.700 ± 0.141 | 0.100 ± 0.000 | " \
           "0.300 ± 0.141 |" in md
    assert "| sst2 | btu | badnets | 2 | trigger word-pieces unlearned | 0.250 ± 0.000 | 1.000 ± 0.000 | – | – |" in md
    assert "| sst2 | finetune |" not in md.split("## Detection")[1]  # flags nothing: no row
    assert "<h2>Detection</h2>" in (tmp_path / "rep" / "report.html").read_text()


def test_a_score_undefined_at_some_seeds_is_averaged_over_the_others_and_says_how_many(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    # recall is undefined (null) where a seed's test set held no poisoned sample
    for seed, recall in ((0, 0.8), (1, None), (2, None)):
        put_run(s, 0.85, 0.3, 20.0, dataset="sst2", attack="badnets", defense="strip", seed=seed,
                metrics={"test_detection": {"precision": 0.5, "recall": recall, "frr": 0.1, "far": 0.2}})
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    # not `0.800 ± 0.000`: a spread over three seeds that one measured
    assert "| sst2 | strip | badnets | 3 | test inputs rejected | 0.500 ± 0.000 | 0.800 (n=1) | 0.100 ± 0.000 |" in md


def test_the_protocol_gives_the_clean_data_options_each_defense_ran_with(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    put_run(s, 0.88, 0.1, 15.0, dataset="sst2", attack="badnets", defense="btu", options={"clean_tuning": "100"})
    put_run(s, 0.86, 0.3, 30.0, dataset="sst2", attack="badnets", defense="muscle-lora",
            metrics={"resolved_settings": {"ref_samples": 96}})  # per backbone: None in the config, resolved at fit
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    protocol = {line.split("**")[1]: line for line in (tmp_path / "rep" / "report.md").read_text().splitlines()
                if line.startswith("- **defense ")}
    assert "with clean_tuning=k, k dev samples are trained on (held out of selection and of the guard) " \
           "(clean_tuning 100);" in protocol["defense btu"]
    assert "(ref_samples 96);" in protocol["defense muscle-lora"]
    assert "clean-data budget: clean dev: model selection only; epochs" in protocol["defense finetune"]


def test_a_setting_a_defense_varies_labels_its_rows_in_every_attacks_column(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    for lr, cacc in ((1e-4, 0.9), (5e-4, 0.6)):  # fine-tuning's lr axis on badnets; addsent at 1e-4 only
        put_run(s, cacc, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", lr=lr)
    put_run(s, 0.9, 0.9, 10.0, dataset="sst2", attack="addsent", defense="finetune", lr=1e-4)
    put_run(s, 0.8, 0.1, 30.0, dataset="sst2", attack="badnets", defense="lora", lr=1e-3)
    put_run(s, 0.7, 0.1, 30.0, dataset="sst2", attack="addsent", defense="lora", lr=2e-3)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text().split("## sst2")[1].split("## ASR")[0]
    # one row per setting: fine-tuning at 1e-4 is one row over both attacks, not an unlabelled addsent row beside
    # a labelled badnets one; LoRA's two lrs are two rows, not one row whose columns hold different settings
    assert sorted(md_rows(md, "finetune")) == ["finetune (lr=0.0001)", "finetune (lr=0.0005)"]
    assert md_rows(md, "finetune")["finetune (lr=0.0001)"][1:7:5] == ["0.900", "0.900"]
    lora = md_rows(md, "lora")
    assert sorted(lora) == ["lora (lr=0.001)", "lora (lr=0.002)"]
    assert lora["lora (lr=0.001)"][1] == "0.800" and lora["lora (lr=0.001)"][6] == "–"
    assert lora["lora (lr=0.002)"][1] == "–" and lora["lora (lr=0.002)"][6] == "0.700"
    # two fine-tuning rows on badnets, neither at LoRA's lr: the cell names the one it is compared with
    assert lora["lora (lr=0.001)"][4] == "+10.0 pt vs finetune (lr=0.0001)"
    assert lora["lora (lr=0.002)"][9] == "+20.0 pt"  # addsent has one fine-tuning row: no choice to name


def test_the_protocol_lists_numbers_in_numeric_order(tmp_path):
    from cleantune.report import build

    s = ResultStore(tmp_path / "s.sqlite")
    for seed in (10, 2, 0, 1):
        put_run(s, 0.9, 0.5, 10.0, dataset="sst2", attack="badnets", defense="finetune", seed=seed)
    _, md, _ = build(s.runs())
    assert "seeds 0, 1, 2, 10" in md  # not 0, 1, 10, 2


def test_the_results_table_tells_apart_runs_that_differ_in_a_setting_it_has_no_column_for(tmp_path, capsys):
    s = ResultStore(tmp_path / "s.sqlite")
    for lr in (1e-3, 2e-3):
        put_run(s, 0.9, 0.5, 10.0, dataset="sst2", attack="badnets", defense="lora", lr=lr)
    put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    assert main(["results", "--store", str(s.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines[0].index("defense")
    assert sorted(line[at:].split("  ")[0] for line in lines[2:]) == ["finetune", "lora (lr=0.001)", "lora (lr=0.002)"]
    # a failed run of another setting (here the epochs) relabelled every row, which the report labels from its
    # successful runs alone; it is labelled as it would be among them
    put_run(s, 0.0, 0.0, 1.0, status="failed", dataset="sst2", attack="badnets", defense="finetune", epochs=1)
    assert main(["results", "--store", str(s.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line[at:].split("  ")[0] for line in lines[2:]) == \
        ["finetune", "finetune (epochs=1)", "lora (lr=0.001)", "lora (lr=0.002)"]
    # labelled among its own dataset's runs: alone on olid, a failed lora run has no setting to tell apart
    put_run(s, 0.0, 0.0, 1.0, status="failed", dataset="olid", attack="badnets", defense="lora", lr=1e-3)
    assert main(["results", "--store", str(s.path), "--dataset", "olid,sst2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line[at:].split("  ")[0] for line in lines[2:]) == \
        ["finetune", "finetune (epochs=1)", "lora", "lora (lr=0.001)", "lora (lr=0.002)"]


def test_a_row_has_one_colour_in_every_plot(tmp_path):
    """The bar charts coloured a dataset's rows by their order in that dataset: lora, alone on olid, took the colour
    fine-tuning has in the scatter plot and on sst2."""
    import io

    import matplotlib.image
    import numpy as np

    from cleantune.report import build, row_colors, summarize

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    put_run(s, 0.8, 0.2, 10.0, dataset="sst2", attack="badnets", defense="lora")
    put_run(s, 0.7, 0.3, 10.0, dataset="olid", attack="badnets", defense="lora")
    colors = row_colors(summarize(s.runs()))
    _, _, images = build(s.runs())

    def has(png, hex_color):
        rgb = np.array(matplotlib.colors.to_rgb(hex_color))
        pixels = matplotlib.image.imread(io.BytesIO(png))[..., :3]
        return bool((np.abs(pixels - rgb).max(-1) < 0.02).any())

    assert colors["finetune"] != colors["lora"]
    assert has(images["bars_olid.png"], colors["lora"]) and not has(images["bars_olid.png"], colors["finetune"])
    assert has(images["bars_sst2.png"], colors["lora"]) and has(images["asr_vs_cacc.png"], colors["lora"])


def test_the_results_table_shows_an_undefined_number_as_the_report_does(tmp_path, capsys):
    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.9, 0.5, 10.0, metrics={"asr_floor": float("nan")}, dataset="sst2", attack="badnets", defense="lora")
    assert main(["results", "--store", str(s.path)]) == 0
    header, _, row = capsys.readouterr().out.splitlines()
    cells = dict(zip(header.split(), row.split()))
    assert cells["asr_floor"] == "-" and cells["CACC"] == "0.9000"  # it printed nan


def test_a_score_stored_as_nan_is_left_out_of_its_mean_as_a_null_one_is(tmp_path):
    """`run` stores an undefined score as NaN, not null: a detection recall with no poisoned sample
    (detection_metrics), a floor with no clean sample of another class (evaluate). Averaged in, one such seed made
    the whole cell NaN; it is left out, and the count says over how many seeds the mean is."""
    from cleantune.report import summarize

    s = ResultStore(tmp_path / "s.sqlite")
    nan = float("nan")
    for seed, recall, floor in ((0, 0.8, 0.2), (1, 0.6, 0.4), (2, nan, nan)):
        put_run(s, 0.85, 0.3, 20.0, dataset="sst2", attack="badnets", defense="strip", seed=seed,
                metrics={"asr_floor": floor, "test_detection": {"precision": 0.5, "recall": recall, "frr": 0.1, "far": 0.2}})
    assert summarize(s.runs())["sst2"]["cells"][("strip", "badnets")]["asr_floor"] == \
        pytest.approx((0.3, 0.02 ** 0.5, 2))  # mean of 0.2 and 0.4, sample std sqrt(((0.1)^2 + (0.1)^2) / 1)
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    # recall over seeds 0 and 1: mean 0.7, sample std sqrt(0.02) = 0.141
    assert "| sst2 | strip | badnets | 3 | test inputs rejected | 0.500 ± 0.000 | 0.700 ± 0.141 (n=2) |" in md


def test_the_baseline_is_a_fine_tuning_row_that_ran_a_seed_of_the_defense(tmp_path):
    """Of two fine-tuning rows (an lr axis), the one sharing no seed with the defense cell is no baseline: picking it
    (the first row) left ΔCACC and time× blank though the other row ran the defense's seed."""
    from cleantune.report import summarize

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.95, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", lr=1e-4, seed=0)
    ft, lora, ft_wall, lora_wall = 0.90, 0.84, 8.0, 4.0
    put_run(s, ft, 1.0, ft_wall, dataset="sst2", attack="badnets", defense="finetune", lr=5e-4, seed=1)
    put_run(s, lora, 0.2, lora_wall, dataset="sst2", attack="badnets", defense="lora", seed=1)
    cell = summarize(s.runs())["sst2"]["cells"][("lora", "badnets")]
    assert cell["compared"] == 1 and cell["cacc_drop"][0] == pytest.approx(ft - lora)
    assert cell["time_rel"] == pytest.approx(lora_wall / ft_wall)


def test_results_filters_take_a_seed_and_a_model_folder_as_run_does(tmp_path, tiny_model, monkeypatch, capsys):
    """`run --seed 01 --model ./bert` stores seed 1 and the folder's absolute path: `results` and `report` with the
    same spelling must find those runs, not refuse the values as held by no run."""
    import json
    from pathlib import Path

    s = ResultStore(tmp_path / "s.sqlite")
    for seed in (0, 1):
        put_run(s, 0.9, 0.5, 10.0, dataset="sst2", attack="badnets", defense="finetune", model=tiny_model, seed=seed)
    monkeypatch.chdir(Path(tiny_model).parent)
    assert main(["results", "--store", str(s.path), "--format", "json", "--seed", "01", "--model", "./bert"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["config"]["seed"], r["config"]["model"]) for r in runs] == [(1, tiny_model)]


def test_results_read_seed_filters_as_numbers(store, capsys):
    # `--seed 01` or `+7` names the seeds 1 and 7, as `run --seed 01` runs seed 1; read as text they matched no run
    import json

    assert main(["results", "--store", str(store.path), "--format", "json", "--seed", "01,+7"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert sorted((r["config"]["defense"], r["config"]["seed"]) for r in runs) == \
        [("finetune", 1), ("lora", 1), ("lora", 7)]


def test_results_model_filter_takes_a_local_folder_by_any_path_to_it(tmp_path, monkeypatch, capsys):
    # `run` records a local model folder by its absolute path; the relative path a user typed for `run` must pick
    # its runs too, not be refused as a model no run has
    import json

    (tmp_path / "models" / "m").mkdir(parents=True)
    s = ResultStore(tmp_path / "s.sqlite")
    cell = {"dataset": "sst2", "attack": "badnets", "defense": "finetune", "seed": 0}
    s.put("a" * 64, {**cell, "model": str(tmp_path / "models" / "m")}, {"cacc": 0.9, "asr": 0.1}, {"wall_s": 1.0}, {})
    s.put("b" * 64, {**cell, "model": "minilm"}, {"cacc": 0.8, "asr": 0.2}, {"wall_s": 1.0}, {})
    monkeypatch.chdir(tmp_path)
    assert main(["results", "--store", str(s.path), "--format", "json", "--model", "models/m"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["a" * 64]


def test_results_csv_and_table_give_each_runs_own_settings(tmp_path, capsys):
    # a paper table is built from these columns: each must hold its own setting, not a neighbour's
    import csv
    import io

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.9, 0.1, 5.0, dataset="sst2", attack="badnets", defense="finetune", seed=3, batch_size=16,
            max_length=64, target=0, lr=2e-4)
    assert main(["results", "--store", str(s.path), "--format", "csv"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["seed"], row["batch_size"], row["max_length"], row["target"]) == ("3", "16", "64", "0")
    assert float(row["lr"]) == 2e-4
    assert main(["results", "--store", str(s.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert dict(zip(lines[0].split(), lines[2].split()))["seed"] == "3"


def test_results_show_detection_scores_of_either_kind_and_a_dash_where_undefined(tmp_path, capsys):
    # det_* are training samples removed (bki) or, for inference-time defenses (strip), test inputs rejected;
    # a recall without poisoned samples to measure it is NaN, shown as "-" (as the report's –), never as "nan"
    import csv
    import io

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.9, 0.1, 5.0, dataset="sst2", attack="badnets", defense="bki",
            metrics={"train_detection": {"precision": 0.25, "recall": 0.75}})
    put_run(s, 0.8, 0.2, 5.0, dataset="sst2", attack="badnets", defense="strip",
            metrics={"test_detection": {"precision": 0.5, "recall": 1.0}})
    put_run(s, 0.7, 0.3, 5.0, dataset="sst2", attack="badnets", defense="strip", seed=1,
            metrics={"test_detection": {"precision": 0.125, "recall": float("nan")}})
    assert main(["results", "--store", str(s.path), "--format", "csv"]) == 0
    rows = {(r["defense"], r["seed"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert (rows["bki", "0"]["det_precision"], rows["bki", "0"]["det_recall"]) == ("0.25", "0.75")
    assert (rows["strip", "0"]["det_precision"], rows["strip", "0"]["det_recall"]) == ("0.5", "1.0")
    assert main(["results", "--store", str(s.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {(r["defense"], r["seed"]): r for r in (dict(zip(lines[0].split(), line.split())) for line in lines[2:])}
    assert (table["bki", "0"]["det_precision"], table["bki", "0"]["det_recall"]) == ("0.2500", "0.7500")
    assert (table["strip", "0"]["det_precision"], table["strip", "0"]["det_recall"]) == ("0.5000", "1.0000")
    assert (table["strip", "1"]["det_precision"], table["strip", "1"]["det_recall"]) == ("0.1250", "-")


def test_time_ratio_is_the_defenses_total_time_over_fine_tunings_over_the_seeds_both_ran(tmp_path):
    """time× is one defense's wall time over fine-tuning's for the same seeds (summed), as the protocol says: a mean
    of per-seed ratios weighs a seed where fine-tuning ran fast as much as one where it ran slow."""
    from cleantune.report import summarize

    s = ResultStore(tmp_path / "s.sqlite")
    ft_walls, lora_walls = (10.0, 30.0), (10.0, 10.0)
    for seed in (0, 1):
        put_run(s, 0.9, 1.0, ft_walls[seed], dataset="sst2", attack="badnets", defense="finetune", seed=seed)
        put_run(s, 0.8, 0.2, lora_walls[seed], dataset="sst2", attack="badnets", defense="lora", seed=seed)
    cell = summarize(s.runs())["sst2"]["cells"][("lora", "badnets")]
    # (10 + 10) / (10 + 30) = 0.5, not the mean of 10/10 and 10/30 (0.67)
    assert cell["time_rel"] == pytest.approx(sum(lora_walls) / sum(ft_walls))


@pytest.mark.parametrize("setting, value", [("model", "/models/other-backbone"), ("mixed_precision", "bf16"),
                                            ("rate", 0.2)])
def test_fine_tuning_on_another_backbone_precision_or_poisoning_is_no_baseline(tmp_path, setting, value):
    """The cell a defense is compared in holds the backbone, the precision and every attack setting: fine-tuning
    of another backbone, at another precision or on data poisoned at another rate is not what the defense cost,
    so ΔCACC and time× stay blank rather than compare two different experiments."""
    from cleantune.report import summarize

    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.90, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    lora = RunConfig(dataset="sst2", attack="badnets", defense="lora").resolve()
    lora[setting] = value  # the one setting that differs from fine-tuning's run
    s.put(config_hash(lora), lora, {"cacc": 0.80, "asr": 0.2}, {"wall_s": 5.0}, {"device": "cpu"})
    (row, cell), = [(k, c) for k, c in summarize(s.runs())["sst2"]["cells"].items() if c["defense"] == "lora"]
    assert cell["cacc"][0] == pytest.approx(0.80)  # the run is there, in a row of its own
    assert cell["cacc_drop"] is None and cell["time_rel"] is None and cell["compared"] == 0, row


def test_a_detection_row_needs_every_seed_of_the_cell_to_have_recorded_it(tmp_path):
    """A cell mixing a run that recorded what it flagged with one that did not (stored before the metric was)
    has no detection row, as a floor over part of the seeds shows none: the report neither fails on the run
    without it nor averages the scores of part of the seeds under the cell's seed count."""
    from cleantune.report import build, detection_rows, summarize

    s = ResultStore(tmp_path / "s.sqlite")
    for seed in (0, 1):
        put_run(s, 0.9, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", seed=seed)
    # seed 0 recorded its flags, seed 1 did not
    put_run(s, 0.85, 0.3, 20.0, dataset="sst2", attack="badnets", defense="strip", seed=0,
            metrics={"test_detection": {"precision": 0.5, "recall": 0.8, "frr": 0.1, "far": 0.2}})
    put_run(s, 0.85, 0.3, 20.0, dataset="sst2", attack="badnets", defense="strip", seed=1)
    put_run(s, 0.88, 0.1, 15.0, dataset="sst2", attack="badnets", defense="btu", seed=0,
            metrics={"btu_token_precision": 0.25, "btu_token_recall": 1.0})
    put_run(s, 0.88, 0.1, 15.0, dataset="sst2", attack="badnets", defense="btu", seed=1)
    assert detection_rows(summarize(s.runs())) == []
    _, md, _ = build(s.runs())
    assert "## Detection" not in md


def test_a_seed_whose_cacc_is_nan_is_no_seed_of_the_cacc_comparison(tmp_path):
    """A NaN CACC passed as a number: ΔCACC counted its seed (no "(n=1)", a spread of 0.0 claimed over two seeds),
    and a cell of NaN CACCs printed "+nan ± nan pt"."""
    from cleantune.report import summarize

    s = ResultStore(tmp_path / "s.sqlite")
    for seed, lora in ((0, 0.80), (1, float("nan"))):
        put_run(s, 0.90, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune", seed=seed)
        put_run(s, lora, 0.2, 5.0, dataset="sst2", attack="badnets", defense="lora", seed=seed)
    cell = summarize(s.runs())["sst2"]["cells"][("lora", "badnets")]
    assert cell["compared"] == 1 and cell["cacc_drop"][2] == 1
    assert abs(cell["cacc_drop"][0] - (0.90 - 0.80)) < 1e-12
    s2 = ResultStore(tmp_path / "all_nan.sqlite")
    put_run(s2, 0.90, 1.0, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    put_run(s2, float("nan"), 0.2, 5.0, dataset="sst2", attack="badnets", defense="lora")
    cell = summarize(s2.runs())["sst2"]["cells"][("lora", "badnets")]
    assert cell["compared"] == 0 and cell["cacc_drop"] is None
