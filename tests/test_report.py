"""The report: mean ± std over seeds, the drop against fine-tuning, self-contained HTML with its plots."""

from __future__ import annotations

import base64
import re

import pytest

from cleantune.cli import main
from cleantune.runner import RunConfig
from cleantune.store import ResultStore, config_hash


def put_run(store: ResultStore, cacc: float, asr: float, wall: float, status: str = "ok", metrics: dict | None = None,
            **config) -> None:
    resolved = RunConfig(**config).resolve()  # a real stored config: every key the report reads
    m = {"cacc": cacc, "asr": asr, **(metrics or {})} if status == "ok" else {}
    store.put(config_hash(resolved), resolved, m, {"wall_s": wall}, {"device": "cpu", "cpu_threads": 2},
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
    assert "| finetune | 2 | 0.910 ± 0.014 | 0.995 ± 0.007 | +0.0 pt | 1.00× |" in md
    assert "| lora | 2 | 0.870 ± 0.014 | 0.250 ± 0.071 | +4.0 pt | 0.50× |" in md
    assert "| lora | 1 | 0.900 | 0.500 | +5.0 pt | 1.50× |" in md  # hsol, one seed: no ±
    for text in ("0.870 ± 0.014", "+4.0 pt", "0.50×"):
        assert text in page
    # plots: a bar chart per dataset, the scatter, the recorded frequency curves; all embedded PNGs
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "Frequency analysis" in page and "plots/asr_vs_cacc.png" in md
    assert len(list((tmp_path / "rep" / "plots").glob("*.png"))) == 4
    # self-contained: nothing is fetched
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page) and "http" not in page
    assert "<link" not in page and "<script" not in page
    # protocol: poison settings per attack, the clean-data budget, the selection rule, the hsol caveat
    assert "attack badnets</dt><dd>poison rate 0.1; mode dirty; target label 1" in page
    assert "attack addsent</dt><dd>poison rate 0.1; mode mix" in page
    assert "clean-data budget: clean dev: model selection only" in page
    assert "clean dev split" in page and "dev and test hold the same 2,485 samples" in page
    assert "RuntimeError: out of memory" in page  # the failed run is listed with its error


def test_report_without_frequency_or_reference_degrades_gracefully(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.8, 0.1, 5.0, dataset="sst2", attack="syntactic", defense="lora")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| lora | 1 | 0.800 | 0.100 | – | – |" in md and "Frequency" not in md
    assert "dev and test hold the same" not in md  # the hsol caveat only where hsol was run


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
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"records": "none"}))
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "r2"), "--frequency", str(bad)]) == 2
    assert "no frequency curves" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_mixed_precision_runs_are_their_own_rows_and_compare_at_their_precision(tmp_path, monkeypatch, capsys):
    s = ResultStore(tmp_path / "s.sqlite")
    put_run(s, 0.90, 1.00, 10.0, dataset="sst2", attack="badnets", defense="finetune")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision` sets
    put_run(s, 0.88, 1.00, 4.0, dataset="sst2", attack="badnets", defense="finetune")
    put_run(s, 0.85, 0.20, 2.0, dataset="sst2", attack="badnets", defense="lora")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert main(["report", "--store", str(s.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| finetune | 1 | 0.900 | 1.000 | +0.0 pt | 1.00× |" in md  # not averaged with the bf16 run
    assert "| lora [bf16] | 1 | 0.850 | 0.200 | +3.0 pt | 0.50× |" in md  # against bf16 fine-tuning
    assert "Precision: bf16 mixed precision, fp32" in md
    capsys.readouterr()
    assert main(["results", "--store", str(s.path), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert "mixed_precision" in rows[0].split(",") and sum(",bf16," in r for r in rows) == 2
