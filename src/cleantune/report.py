"""The benchmark report: from the store to one self-contained HTML file and its Markdown twin.

"Which defense should I use on my data, and what does it cost?": per dataset a defenses x attacks table
of CACC and ASR (mean ± std over seeds), the CACC drop against plain fine-tuning and the wall time
relative to it; plots; and the protocol the numbers were made under. The HTML embeds its plots as base64
PNG and its CSS inline, so it opens in a browser with no network; the Markdown links the same PNGs.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import io
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

from .attacks import ATTACKS
from .errors import UserError
from .store import ResultStore, _number, data_dir, matches, select_runs, write_whole

REFERENCE = "finetune"  # the plain fine-tuning every defense is measured against
ATTACK_ORDER = ("badnets", "addsent", "syntactic", "style")
IGNORED_KEYS = {"seed", "versions", "mixed_precision"}  # what may differ between the seeds of one cell
# (a mixed-precision run is never a seed of a full-precision cell: its row carries the precision, _precision_tag)

# What a cell is, for comparing a defense with plain fine-tuning: the data (dataset, train size), the attack
# with every one of its settings, the backbone and the precision; compared seed by seed over the seeds both
# ran (_compared). The defense's own settings (epochs, lr, batch size, max length, its options) are not part of it:
# each defense trains with its own budget (muscle-lora's 10 epochs against fine-tuning's 3), and ΔCACC
# and time× are what that costs against fine-tuning on the same data.
ATTACK_KEYS = tuple(sorted({f.name for a in ATTACKS.values() for f in fields(a)} - {"seed"}))
CELL_KEYS = ("dataset", "train_size", "attack", *ATTACK_KEYS, "model", "mixed_precision")


# The cell's settings that label every row of a dataset's table where they differ in it, an attack's
# settings where they differ in its column (_variant_rows); the precision has its own tag (_precision_tag).
TABLE_KEYS = tuple(k for k in CELL_KEYS if k not in ("dataset", "attack", "mixed_precision"))


def cell_key(config: dict) -> tuple:
    return tuple(_json(config.get(k)) for k in CELL_KEYS)


# ---------------------------------------------------------------- numbers


def _mean_std(xs: list[float]) -> tuple[float, float, int]:
    """Mean, sample std and count over the values that are numbers: an undefined one (None, NaN: a recall with
    no poisoned sample, a floor with no non-target sample) is no seed's value, so k may be below the seeds."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def _json(v) -> str:
    return json.dumps(v, sort_keys=True)


def _variant_rows(runs: list[dict]) -> dict[str, tuple[tuple, str]]:
    """Run id -> (row key, row label). Runs of one dataset/attack/defense that differ in more than the seed
    (an lr axis, another train size, another backbone) are separate rows: the key holds the full values of
    the settings that differ, the label short forms of them that stay as distinct as the values (_forms).
    A defense's own setting (lr, epochs, its options) counts over the defense's runs in the dataset's table.
    A setting of the cell (TABLE_KEYS) that differs within a dataset's table labels every row there, each
    defense's too where the defense ran only one value of it: ΔCACC and time× pair a row with fine-tuning
    on the same cell, and the label says which. Train size and backbone count over the whole table, an
    attack's settings over its own column (BadNets at 10 % and AddSent at 20 % label no row)."""
    scopes: dict[tuple, list[dict]] = defaultdict(list)  # (dataset,) and (dataset, attack) -> their runs
    groups: dict[tuple, list[dict]] = defaultdict(list)
    mates: dict[tuple, list[dict]] = defaultdict(list)  # (dataset, defense) -> its runs over every attack
    for r in runs:
        c = r["config"]
        scopes[(c["dataset"],)].append(r)
        scopes[(c["dataset"], c["attack"])].append(r)
        groups[(c["dataset"], c["attack"], c["defense"])].append(r)
        mates[(c["dataset"], c["defense"])].append(r)
    table_forms = defaultdict(dict)  # scope -> {key: forms}: one value, one short form in every row
    for scope, rs in scopes.items():
        for k in TABLE_KEYS:
            if (k in ATTACK_KEYS) == (len(scope) == 2):
                present = [r["config"][k] for r in rs if k in r["config"]]
                if len({_json(v) for v in present}) > 1:
                    table_forms[scope][k] = _forms(present)
    out = {}
    for (dataset, attack, defense), rs in groups.items():
        keys = sorted({k for r in rs for k in r["config"]} - IGNORED_KEYS)
        scoped = {**table_forms[(dataset,)], **table_forms[(dataset, attack)]}
        table = {k: f for k, f in scoped.items() if k in keys}
        # a defense's own setting counts over its runs in the whole table, as a row spans every attack's column:
        # counted per attack, an lr axis on one attack left the other attack's run of one of its lrs in an
        # unlabelled row of its own, and two attacks run at two lrs shared one unlabelled row
        ours = mates[(dataset, defense)]
        own = [k for k in keys if k not in table and k != "attack" and k not in ATTACK_KEYS
               and len({_json(r["config"].get(k)) for r in ours}) > 1]
        forms = {**table, **{k: _forms([r["config"].get(k) for r in ours]) for k in own}}
        varying = sorted(forms)
        for r in rs:
            c = r["config"]
            key = (c["defense"], c.get("mixed_precision"), *((k, _json(c.get(k))) for k in varying))
            label = ", ".join(f"{k}={forms[k].get(_json(c.get(k)), _short(c.get(k)))}" for k in varying)
            out[r["id"]] = key, c["defense"] + _precision_tag(c) + (f" ({label})" if label else "")
    return out


def _short(v, depth: int = 1) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and "/" in v:
        return "/".join(v.rstrip("/").split("/")[-depth:])
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _forms(values: list) -> dict[str, str]:
    """JSON of each value -> its short form, as short as keeps different values apart: a path by its last
    component, or by as many trailing ones as tell two paths apart (/tmp/a/model and /tmp/b/model: a/model,
    b/model); the full value where no short form does (two floats equal to 6 digits)."""
    distinct = {_json(v): v for v in values}
    longest = max((v.rstrip("/").count("/") + 1 for v in distinct.values() if isinstance(v, str)), default=1)
    for depth in range(1, longest + 1):
        forms = {j: _short(v, depth) for j, v in distinct.items()}
        if len(set(forms.values())) == len(forms):
            return forms
    return {j: j for j in distinct}


def _cost_s(run: dict) -> float | None:
    """A run's wall time less what it spent only on reporting (BTU's evaluation after each stage)."""
    wall = run["timings"].get("wall_s")
    # null, as the store lets any timing be, is none spent (a TypeError here stopped the report)
    return None if wall is None else wall - (run["timings"].get("stage_eval_s") or 0.0)


def summarize(runs: list[dict]) -> dict:
    """{dataset: {"attacks": [...], "rows": [...], "cells": {(row, attack): {...}}}} over the ok runs, the newest
    of each seed. A cell's "asr_floor" is nan unless every run of it recorded one (runs stored before the floor was)."""
    ok = [r for r in runs if r["status"] == "ok"]
    variants = _variant_rows(ok)
    out: dict = {}
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        c = r["config"]
        by_cell[(c["dataset"], c["attack"], variants[r["id"]][0])].append(r)
    for (dataset, attack, _), rs in by_cell.items():
        # one run per seed, the newest: the same seed stored again under other package versions (a new run id)
        # is a rerun, not another seed
        newest = {}
        for r in sorted(rs, key=lambda r: r.get("created") or 0):
            newest[_json(r["config"].get("seed"))] = r
        rs = list(newest.values())
        row = variants[rs[0]["id"]][1]
        d = out.setdefault(dataset, {"attacks": [], "rows": [], "cells": {}})
        d["attacks"].append(attack) if attack not in d["attacks"] else None
        d["rows"].append(row) if row not in d["rows"] else None
        cacc = _mean_std([r["metrics"].get("cacc") for r in rs])
        asr = _mean_std([r["metrics"].get("asr") for r in rs])
        floors = [r["metrics"].get("asr_floor") for r in rs]  # a run stored before the floor was recorded: None
        floor = _mean_std(floors) if None not in floors else (float("nan"), float("nan"), 0)  # not over some seeds
        d["cells"][(row, attack)] = {"defense": rs[0]["config"]["defense"], "cell": cell_key(rs[0]["config"]),
                                     "seeds": frozenset(_json(r["config"].get("seed")) for r in rs),
                                     "cacc": cacc, "asr": asr, "asr_floor": floor,
                                     "n": len(rs), "runs": rs,
                                     # seeds whose model predicts one class on every clean test sample: its
                                     # CACC, ASR and floor say nothing of the defense (`run` warns of it too)
                                     "one_class": sum(r["metrics"].get("predicted_classes") == 1 for r in rs)}
    for d in out.values():
        d["attacks"].sort(key=lambda a: (ATTACK_ORDER.index(a) if a in ATTACK_ORDER else 99, a))
        d["rows"].sort(key=lambda r: (r.split(" ")[0] != REFERENCE, r))
        for (row, attack), cell in d["cells"].items():
            name, ref = _reference(d, row, attack)
            cell.update(_compared(cell, ref), reference=name)
    return out


def _compared(cell: dict, ref: dict | None) -> dict:
    """ΔCACC and time× against fine-tuning, paired by seed over the seeds both ran (the same seed: the same poisoned
    data and draws), so one failed or missing seed costs that seed, not the comparison. `cacc_drop`: mean and
    sample std of the per-seed differences; `compared`: how many seeds."""
    none = {"cacc_drop": None, "time_rel": None, "compared": 0}
    if ref is None:
        return none
    def by_seed(rs):
        return {_json(r["config"].get("seed")): r for r in rs}

    def numbers(pairs):  # (defense's, fine-tuning's) per seed, where both are numbers (NaN is none, as in _mean_std)
        return [(a, b) for a, b in pairs
                if all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b))]

    mine, theirs = by_seed(cell["runs"]), by_seed(ref["runs"])
    seeds = sorted(set(mine) & set(theirs))
    diffs = [b - a for a, b in numbers((mine[s]["metrics"].get("cacc"), theirs[s]["metrics"].get("cacc"))
                                       for s in seeds)]
    if not diffs:
        return none
    walls = numbers((_cost_s(mine[s]), _cost_s(theirs[s])) for s in seeds)
    ref_wall = sum(b for _, b in walls)
    return {"cacc_drop": _mean_std(diffs), "compared": len(diffs),
            "time_rel": sum(a for a, _ in walls) / ref_wall if walls and ref_wall > 0 else None}


def _precision_tag(config: dict) -> str:
    mp = config.get("mixed_precision")
    return f" [{mp}]" if mp else ""


def _reference(d: dict, row: str, attack: str) -> tuple[str | None, dict | None]:
    """Plain fine-tuning on the same cell (cell_key) with a seed in common: of several (a fine-tuning lr axis),
    the row with the defense's own variant label if there is one, else the first. (None, None) when fine-tuning
    did not run that cell: another cell's numbers (another train size, backbone) are no baseline. The name is
    that row's where it is a choice the labels do not show (several rows and none the defense's own), else None."""
    cell = d["cells"][(row, attack)]
    same = {r: ref for r in d["rows"] if (ref := d["cells"].get((r, attack))) is not None
            and ref["defense"] == REFERENCE and ref["cell"] == cell["cell"] and ref["seeds"] & cell["seeds"]}
    if not same:
        return None, None
    own = REFERENCE + row[len(cell["defense"]):]
    name = min(same, key=lambda r: r != own)
    return (name if len(same) > 1 and name != own else None), same[name]


# ---------------------------------------------------------------- plots (matplotlib, PNG bytes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def row_colors(summary: dict) -> dict[str, str]:
    """One colour per row label over every dataset: a row has the same colour in the scatter and every bar chart."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    rows = sorted({r for d in summary.values() for r in d["rows"]})
    return {n: matplotlib.colors.to_hex(cmap(i % 10)) for i, n in enumerate(rows)}


def _plain_text(plot):
    """Labels are user text (an AddSent sentence, a file name): a '$' must print as itself, not start
    matplotlib's math mode (which garbles the label, or raises on one it cannot parse)."""
    import functools

    @functools.wraps(plot)
    def wrapped(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)
    return wrapped


def cacc_axis(summary: dict) -> tuple[float, float]:
    """The scatter's CACC axis, one for every panel and at least 10 points wide: autoscaled, a 0.1-point gap
    filled a panel, and panels side by side had different ranges."""
    ends = [x for d in summary.values() for c in d["cells"].values()
            for x in (c["cacc"][0] - c["cacc"][1], c["cacc"][0] + c["cacc"][1]) if math.isfinite(x)]
    lo, hi = (min(ends), max(ends)) if ends else (0.0, 1.0)
    pad = max(0.02, (0.1 - (hi - lo)) / 2)
    return lo - pad, hi + pad


@_plain_text
def plot_scatter(summary: dict) -> bytes | None:
    """ASR against CACC, one panel per attack, a point per dataset x defense (error bars: std over seeds); the
    ASR floor of each point, where recorded, as a hollow triangle of its colour, joined to it by a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({a for d in summary.values() for a in d["attacks"]},
                     key=lambda a: (ATTACK_ORDER.index(a) if a in ATTACK_ORDER else 99, a))
    if not attacks:
        return None
    colors, markers = row_colors(summary), dict(zip(sorted(summary), "osD^vP*X"))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 4), squeeze=False)
    xlim = cacc_axis(summary)
    floors = False
    for ax, attack in zip(axes[0], attacks):
        ax.set_xlim(*xlim)
        for dataset, d in sorted(summary.items()):
            for row in d["rows"]:
                c = d["cells"].get((row, attack))
                if c is None:
                    continue
                ax.errorbar(c["cacc"][0], c["asr"][0], xerr=c["cacc"][1], yerr=c["asr"][1],
                            fmt=markers.get(dataset, "o"), color=colors[row], ms=7, capsize=2,
                            label=f"{dataset} · {row}")
                floor = c["asr_floor"][0]
                if not math.isnan(floor):
                    ax.plot([c["cacc"][0]] * 2, [floor, c["asr"][0]], ls=":", lw=1, color=colors[row])
                    ax.plot(c["cacc"][0], floor, marker="v", ms=7, mfc="none", ls="none", color=colors[row])
                    floors = True
        ax.set_title(attack)
        ax.set_xlabel("CACC (clean accuracy)")
        ax.set_ylabel("ASR (attack success)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if floors:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="v", ms=7, mfc="none", ls="none", color="0.3"))
        labels.append("ASR floor (no trigger; in the point's colour)")
    fig.tight_layout()  # the axis labels get their room first; the legend hangs below them (savefig keeps it)
    # columns by label length: long row labels in four columns made a very wide figure around a small panel
    ncol = max(1, min(4, len(labels), 120 // max(len(lab) for lab in labels)))
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("Lower right is better: high clean accuracy, low attack success", y=1.04)
    return _png(fig)


@_plain_text
def plot_bars(dataset: str, d: dict, colors: dict[str, str]) -> bytes:
    """Per dataset: CACC and ASR bars, attacks on the x axis, a bar per defense; on each ASR bar a dashed black
    line at its ASR floor, where recorded. `colors`: a row's colour, as in the scatter plot (row_colors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks, rows = d["attacks"], d["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(attacks) * 2 + 2), 3.6))
    width = 0.8 / max(1, len(rows))
    floor_label = False  # one legend entry for the floor lines
    for ax, metric, title in ((axes[0], "cacc", "CACC (higher is better)"), (axes[1], "asr", "ASR (lower is better, down to the floor)")):
        ax.set_ylabel({"cacc": "clean accuracy", "asr": "attack success rate"}[metric])
        for i, row in enumerate(rows):
            xs, ys, es, floors = [], [], [], []
            for j, attack in enumerate(attacks):
                c = d["cells"].get((row, attack))
                if c is not None:
                    xs.append(j + (i - (len(rows) - 1) / 2) * width)
                    ys.append(c[metric][0])
                    es.append(c[metric][1])
                    floors.append(c["asr_floor"][0])
            ax.bar(xs, ys, width, yerr=es, color=colors[row], label=row, capsize=2)
            drawn = [(x, f) for x, f in zip(xs, floors) if not math.isnan(f)]
            if metric == "asr" and drawn:
                ax.hlines([f for _, f in drawn], [x - width / 2 for x, _ in drawn], [x + width / 2 for x, _ in drawn],
                          colors="black", linestyles="--", lw=1.5, zorder=3,
                          label=None if floor_label else "ASR floor (no trigger)")
                floor_label = True
        ax.set_xticks(range(len(attacks)), attacks)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(dataset, y=1.02)  # above the panels' own titles (savefig's tight box keeps it)
    return _png(fig)


def frequency_curves(run: dict) -> dict | None:
    """The frequency analysis of a run when one was recorded: metrics['frequency'], or a frequency*.json or
    curves.json in the run's work folder."""
    freq = run["metrics"].get("frequency")
    if freq is None:
        work = data_dir() / "runs" / run["id"][:16]
        files = sorted([*work.glob("**/frequency*.json"), *work.glob("**/curves.json")]) if work.is_dir() else []
        if files:
            freq = _read_json(files[0])
    return parse_frequency(freq)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: arrays nested past Python's stack
        return None


def _curve_value(x) -> float:
    """A curve's value or step as a float; ValueError for anything else (a bool, a string, a list, an integer
    too large for a float), so a damaged file is refused instead of reaching matplotlib."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(x)
    try:
        return float(x)
    except OverflowError:
        raise ValueError(x) from None


def parse_frequency(freq) -> dict | None:
    """Curves from either shape: `cleantune analyze frequency`'s curves.json ({"deltas", "records": [{"step",
    set: {"e_low": [per delta], "e_high": [...]}}]}), plotted at the smallest and largest delta; or plain
    {"steps": [...], name: [values] or {name: [values]}}. None when there is nothing to plot."""
    try:
        return _parse_frequency(freq)
    except RecursionError:  # dicts nested past Python's stack
        return None


def _parse_frequency(freq) -> dict | None:
    if not isinstance(freq, dict):
        return None
    curves: dict[str, list[float]] = {}
    records = freq.get("records")
    if "records" in freq or "deltas" in freq:  # the analysis' shape: its other keys are no curves to walk
        if not (isinstance(records, list) and records and all(isinstance(r, dict) for r in records)):
            return None
        deltas = freq.get("deltas") or []
        if not isinstance(deltas, list):  # a number there raised a TypeError before any curve was read
            return None
        picks = sorted({0, len(deltas) - 1}) if deltas else [0]
        sets = [k for k, v in records[0].items() if isinstance(v, dict)]
        try:
            for name in sets:
                for key in ("e_low", "e_high"):
                    for k in picks:
                        vals = [r[name][key] for r in records]
                        vals = [v[k] if isinstance(v, list) else v for v in vals]
                        label = f"{name} {key}" + (f" (δ={deltas[k]:g})" if deltas else "")
                        if key == "e_high" and records[0][name].get("e_high_denominator") == "target":
                            label += ", / mean ||Y||"  # as analyze frequency labels it: one target, the 0/0 fix
                        # null: e_high undefined at that delta (curves.json writes NaN as null)
                        curves[label] = [math.nan if v is None else _curve_value(v) for v in vals]
            steps = [_curve_value(r.get("step", i)) for i, r in enumerate(records)]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        return {"steps": steps, "curves": curves} if curves else None

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k != "steps":
                    walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(node, list) and node:
            try:
                curves[prefix] = [_curve_value(x) for x in node]
            except ValueError:  # not a curve
                pass

    walk("", freq)
    if not curves:
        return None
    try:
        steps = [_curve_value(x) for x in freq.get("steps")]
    except (TypeError, ValueError):  # no steps, or not numbers: the curves are plotted against their index
        steps = None
    return {"steps": steps, "curves": curves}


@_plain_text
def plot_frequency(title: str, freq: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, ys in list(freq["curves"].items())[:12]:  # a readable plot, not every kernel width
        xs = freq["steps"] if freq["steps"] and len(freq["steps"]) == len(ys) else list(range(len(ys)))
        ax.plot(xs, ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("relative error")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"frequency analysis: {title}")
    ax.grid(alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------- tables and protocol


def _fmt(ms: tuple[float, float, int], n: int) -> str:
    """Mean ± std over the k seeds with a value, and (n=k) where that is fewer than the cell's n: one value of
    three read `0.500 ± 0.000`, a spread never measured."""
    m, s, k = ms
    if math.isnan(m):
        return "–"
    return (f"{m:.3f} ± {s:.3f}" if k > 1 else f"{m:.3f}") + (f" (n={k})" if k < n else "")


ONE_CLASS_MARK = " †"
ONE_CLASS_NOTE = ("† a seed of this cell predicts one class for every clean test sample (too few samples or epochs, "
                  "or too high an lr): its CACC, ASR and floor say nothing of the defense.")


# what a defense flagged, scored against the attack's ground truth after training (runner.detection, BTU's audit)
DETECTION_HEADER = ["dataset", "defense", "attack", "seeds", "flagged", "precision", "recall", "FRR", "FAR"]
DETECTION_NOTE = ("Precision and recall of what each defense flagged, against the attack's ground truth, which the "
                  "defense never sees (read after training); FRR: share of clean samples flagged; FAR: share of "
                  "poisoned samples let through; mean ± sample std over seeds.")


def detection_rows(summary: dict) -> list[list[str]]:
    """A row per dataset, defense row, attack and kind of flagging, where every seed of the cell recorded it."""
    kinds = (("train_detection", "training samples removed"), ("test_detection", "test inputs rejected"))
    out = []
    for dataset, d in sorted(summary.items()):
        for row in d["rows"]:
            for attack in d["attacks"]:
                c = d["cells"].get((row, attack))
                if c is None:
                    continue
                ms = [r["metrics"] for r in c["runs"]]
                found = [(what, [m[key] for m in ms]) for key, what in kinds if all(isinstance(m.get(key), dict) for m in ms)]
                if all(m.get("btu_token_precision") is not None or m.get("btu_token_recall") is not None for m in ms):
                    found.append(("trigger word-pieces unlearned", [{"precision": m.get("btu_token_precision"),
                                                                     "recall": m.get("btu_token_recall")} for m in ms]))
                for what, scores in found:
                    out.append([dataset, row, attack, str(c["n"]), what] + [
                        _fmt(_mean_std([s.get(k) for s in scores]), c["n"]) for k in ("precision", "recall", "frr", "far")])
    return out


def _fmt_drop(c: dict) -> str:
    """ΔCACC in points: ± the std of the per-seed differences over two or more seeds, and (n=k) where fewer seeds
    than the cell's were compared."""
    if c.get("cacc_drop") is None:
        return "–"
    (m, sd, _), k = c["cacc_drop"], c["compared"]
    text = f"{100 * m:+.1f} ± {100 * sd:.1f} pt" if k > 1 else f"{100 * m:+.1f} pt"
    # against which of several fine-tuning rows, where the labels do not pair them (time× is against it too)
    return text + (f" (n={k})" if k < c["n"] else "") + (f" vs {c['reference']}" if c.get("reference") else "")


CELL_COLUMNS = ("CACC", "ASR", "ASR floor", "ΔCACC", "time×")  # per attack, in a dataset's table


def table_rows(d: dict) -> tuple[list[str], list[list[str]]]:
    header = ["defense", "seeds"]
    for a in d["attacks"]:
        header += [f"{a} {c}" for c in CELL_COLUMNS]
    rows = []
    for row in d["rows"]:
        cells = [d["cells"].get((row, a)) for a in d["attacks"]]
        counts = sorted({c["n"] for c in cells if c})
        line = [row, "/".join(map(str, counts))]  # 2/10, not 10/2
        for c in cells:
            if c is None:
                line += ["–"] * 5
                continue
            # which cell of a "2/3" row has fewer seeds; † where a seed's model predicts a single class
            mark = (f" (n={c['n']})" if len(counts) > 1 else "") + (ONE_CLASS_MARK if c.get("one_class") else "")
            line += [_fmt(c["cacc"], c["n"]) + mark, _fmt(c["asr"], c["n"]), _fmt(c["asr_floor"], c["n"]),
                     _fmt_drop(c),
                     "–" if c["time_rel"] is None else f"{c['time_rel']:.2f}×"]
        rows.append(line)
    return header, rows


def _used_setting(run: dict, key: str):
    """A training setting as the run used it: the value the defense resolved (metrics["resolved_settings"],
    e.g. muscle-lora's per-backbone lr where the config holds None, "its default") where it recorded one,
    else the config's."""
    resolved = run["metrics"].get("resolved_settings")
    if isinstance(resolved, dict) and resolved.get(key) is not None:
        return resolved[key]
    return run["config"].get(key)


CLEAN_DATA_OPTIONS = ("clean_tuning", "ref_samples")  # BTU's and the GA variants' clean dev samples


def protocol(runs: list[dict]) -> list[tuple[str, str]]:
    """(topic, statement) pairs: the settings every number above was produced under; a defense's training
    settings as used (_used_setting)."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:  # no numbers, nothing they were produced under
        return []

    def values(key, rs=ok, get=lambda r, k: r["config"][k]):
        forms = _forms([get(r, key) for r in ok if key in r["config"]])  # one form per value, report-wide
        held = {_json(get(r, key)): get(r, key) for r in rs if key in r["config"]}
        # numbers in numeric order (seeds 0, 1, 2, 10, not 0, 1, 10, 2), then the rest as text
        order = sorted(held, key=lambda j: (0, held[j], "") if _number(held[j]) else (1, 0, str(forms[j])))
        return list(dict.fromkeys(forms[j] for j in order))

    def used(key, rs):  # a training setting as the run used it: None (the defense's default) resolved
        return [v if v != "None" else "default (not recorded)" for v in values(key, rs, _used_setting)]

    items = []
    for attack in sorted({r["config"]["attack"] for r in ok}):
        rs = [r for r in ok if r["config"]["attack"] == attack]
        extra = [f"{k} {', '.join(values(k, rs))}" for k in ("triggers", "num_triggers", "sentence") if values(k, rs)]
        items.append((f"attack {attack}", f"poison rate {', '.join(values('rate', rs))}; mode {', '.join(values('mode', rs))}; "
                      f"target label {', '.join(values('target', rs))}" + ("; " + "; ".join(extra) if extra else "")))
    items.append(("training data", f"train size {', '.join(v if v != 'None' else 'full split' for v in values('train_size'))}; "
                  f"backbone {', '.join(values('model'))}; seeds {', '.join(values('seed'))}"))
    for defense in sorted({r["config"]["defense"] for r in ok}):
        rs = [r for r in ok if r["config"]["defense"] == defense]
        # the options that size the budget, as the runs set them (the declaration names them, not their values)
        sized = [f"{k} {', '.join(used(k, rs))}" for k in CLEAN_DATA_OPTIONS if values(k, rs)]
        items.append((f"defense {defense}", f"clean-data budget: {'; '.join(values('clean_data', rs)) or 'not recorded'}"
                      + (f" ({'; '.join(sized)})" if sized else "")
                      + f"; epochs {', '.join(used('epochs', rs))}; lr {', '.join(used('lr', rs))}"))
    items.append(("selection rule", "every defense keeps the epoch with the best accuracy on the clean dev split; "
                  "nothing is selected on poisoned data or on the test split. CACC is accuracy on the clean test "
                  "split; ASR is the share of triggered non-target test samples classified as the target; the ASR floor is "
                  "the share of the clean non-target test samples classified as the target without a trigger."))
    items.append(("statistics", "mean ± sample standard deviation over seeds (the seed drives poisoning, subsampling "
                  "and training); ΔCACC = plain fine-tuning's CACC minus the defense's, in points (positive: "
                  "accuracy lost), mean ± sample standard deviation of the differences seed by seed, over the seeds "
                  "both ran; time× = the defense's wall time over plain fine-tuning's for the same cell and seeds "
                  "(less the evaluations BTU makes after each stage for this report, which a user of the defense "
                  "does not run)."))
    caveats = ["syntactic and style paraphrases are the original authors' (SCPN, STRAP), not generated here"]
    if any(r["config"]["dataset"] == "hsol" for r in ok):
        caveats.insert(0, "hsol: dev and test hold the same 2,485 samples (as in the MuScleLoRA and BTU releases), "
                       "so selecting on hsol dev and reporting hsol test is not an independent estimate")
    items.append(("data caveats", "; ".join(caveats)))
    versions = sorted({", ".join(f"{k} {v}" for k, v in sorted(r["config"].get("versions", {}).items())) for r in ok})
    devices = sorted({f"{r['env'].get('device', '?')} (torch threads: {r['env'].get('cpu_threads', '?')})" for r in ok})
    precisions = sorted({r["config"].get("mixed_precision", "fp32") for r in ok})
    items.append(("software and hardware", "; ".join(versions) + ". Runs on " + "; ".join(devices)
                  + ". Precision: " + ", ".join(p if p == "fp32" else f"{p} mixed precision" for p in precisions)))
    return items


# ---------------------------------------------------------------- writers

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1400px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
table{border-collapse:collapse;margin:10px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
tr.ref td{background:#fafafa;font-style:italic}
img{max-width:100%;border:1px solid #eee;margin:8px 0}.wide{overflow-x:auto}
dl dt{font-weight:600;margin-top:6px}dl dd{margin-left:18px}
.muted{color:#666;font-size:0.9em}pre{background:#f6f6f6;padding:6px;white-space:pre-wrap}
"""


def _md(cell: str) -> str:
    """User text (an AddSent sentence, an error) as Markdown text: its HTML escaped (Markdown renders raw
    HTML), its backslashes kept (one before a '|' took that '|''s escape, and one before other punctuation
    vanished), and no '|' or line break (Markdown ends a line at '\\r' as at '\\n') to start a new table
    column or end a row or list item."""
    text = html.escape(cell, quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"\r\n?|\n", " ", text)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def _title(c: dict) -> str:
    return f"{c.get('dataset')} {c.get('attack')} {c.get('defense')} seed {c.get('seed')}"


def build(runs: list[dict], frequency_files: tuple = (), where: dict[str, list[str]] | None = None,
          reference_added: bool = False) -> tuple[str, str, dict[str, bytes]]:
    """HTML, Markdown and the PNG plots (name -> bytes). `frequency_files`: curves.json files written by
    `cleantune analyze frequency`, plotted with the runs' own recorded curves. `where`: the selection the runs
    were made by, stated in the report; `reference_added`: plain fine-tuning's runs were added to it as the
    baseline (write_report)."""
    summary = summarize(runs)
    images: dict[str, bytes] = {}
    scatter = plot_scatter(summary)
    if scatter:
        images["asr_vs_cacc.png"] = scatter
    for dataset, d in sorted(summary.items()):
        images[f"bars_{dataset}.png"] = plot_bars(dataset, d, row_colors(summary))
    freq_plots = []  # (title, image name)
    for r in runs:
        if r["status"] == "ok":
            f = frequency_curves(r)
            if f is not None:
                name = f"frequency_{r['id'][:12]}.png"
                images[name] = plot_frequency(_title(r["config"]), f)
                freq_plots.append((_title(r["config"]), name))
    for i, path in enumerate(frequency_files):
        data = _read_json(path)
        f = parse_frequency(data)
        if f is None:
            empty = isinstance(data, dict) and data.get("records") == []
            raise UserError(f"--frequency {path}: no frequency curves in this file"
                            + (" (its records list is empty: the analysis recorded no step)" if empty else ""))
        title = _title(data["config"]) if isinstance(data.get("config"), dict) else Path(path).parent.name
        name = f"frequency_file{i}.png"
        images[name] = plot_frequency(title, f)
        freq_plots.append((title, name))
    failed = [r for r in runs if r["status"] != "ok"]
    n_ok = len(runs) - len(failed)
    selection = "; ".join(f"{k} {', '.join(v)}" for k, v in (where or {}).items())
    if selection and reference_added:
        selection += f" (and {REFERENCE}, the baseline of ΔCACC and time×)"
    source = "selected runs" if where else "stored runs"
    if n_ok:
        intro = (f"{len(runs)} {source}: {n_ok} ok, {len(failed)} failed; over {len(summary)} dataset(s). "
                 "CACC: clean test accuracy (higher is better). ASR: attack success rate (lower is better, but "
                 "read it against the ASR floor: the share of clean non-target test samples predicted as the "
                 "target without the trigger, where a model that ignores the trigger sits; – where not recorded). "
                 f"ΔCACC (fine-tuning's CACC minus the defense's, in points) and time× (wall time over fine-tuning's) "
                 f"compare with plain fine-tuning ({REFERENCE}) on the same cell, seed by seed over the seeds both "
                 "ran: ΔCACC is the mean ± sample std of the per-seed differences, n= where fewer seeds than the "
                 "cell's were compared; – where fine-tuning did not run that cell. "
                 "seeds: runs per cell (a/b: the cells of the row differ, each marked n=).")
    elif failed:
        intro = f"No successful runs among the {source}, {len(failed)} failed: nothing to compare."
    elif where:
        intro = "No stored run matches the selection: nothing to report."
    else:
        intro = "The store holds no runs: nothing to report."
    if selection:
        intro += f" Selection: {selection}."

    h = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>cleantune report</title>",
         f"<style>{CSS}</style></head><body><h1>cleantune benchmark report</h1>",
         f"<p class='muted'>{html.escape(intro)}</p>"]
    m = ["# cleantune benchmark report", "", intro, ""]

    def img(name: str, alt: str) -> None:
        h.append(f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(images[name]).decode()}'>")
        m.extend([f"![{alt}](plots/{name})", ""])

    for dataset, d in sorted(summary.items()):
        header, rows = table_rows(d)
        # two header rows (the attack over its five columns) in a box that scrolls sideways: four attacks make
        # 22 columns, wider than the page
        h.append(f"<h2>{html.escape(dataset)}</h2><div class='wide'><table><tr>"
                 + "".join(f"<th rowspan='2'>{html.escape(c)}</th>" for c in header[:2])
                 + "".join(f"<th colspan='{len(CELL_COLUMNS)}'>{html.escape(a)}</th>" for a in d["attacks"])
                 + "</tr><tr>" + "".join(f"<th>{html.escape(c)}</th>" for _ in d["attacks"] for c in CELL_COLUMNS)
                 + "</tr>")
        for row in rows:
            cls = " class='ref'" if row[0].split(" ")[0] == REFERENCE else ""
            h.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        h.append("</table></div>")
        m.extend([f"## {dataset}", "", _md_row(header), "|" + "---|" * len(header)])
        m.extend(_md_row(row) for row in rows)
        m.append("")
        if any(c.get("one_class") for c in d["cells"].values()):
            h.append(f"<p class='muted'>{html.escape(ONE_CLASS_NOTE)}</p>")
            m.extend([ONE_CLASS_NOTE, ""])
        img(f"bars_{dataset}.png", f"CACC and ASR per attack on {dataset}")
    detections = detection_rows(summary)
    if detections:
        h.append("<h2>Detection</h2><div class='wide'><table><tr>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in DETECTION_HEADER) + "</tr>")
        h.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in detections)
        h.append(f"</table></div><p class='muted'>{html.escape(DETECTION_NOTE)}</p>")
        m.extend(["## Detection", "", _md_row(DETECTION_HEADER), "|" + "---|" * len(DETECTION_HEADER)])
        m.extend(_md_row(row) for row in detections)
        m.extend(["", DETECTION_NOTE, ""])
    if scatter:
        h.append("<h2>ASR against CACC, per attack</h2>")
        m.extend(["## ASR against CACC, per attack", ""])
        img("asr_vs_cacc.png", "ASR against CACC per attack")
    if freq_plots:
        h.append("<h2>Frequency analysis</h2>")
        m.extend(["## Frequency analysis", ""])
        for title, name in freq_plots:
            img(name, f"frequency curves: {title}")
    items = protocol(runs)
    if items:
        h.append("<h2>Protocol</h2><dl>")
        m.extend(["## Protocol", ""])
        for topic, text in items:
            h.append(f"<dt>{html.escape(topic)}</dt><dd>{html.escape(text)}</dd>")
            m.append(f"- **{_md(topic)}**: {_md(text)}")
        h.append("</dl>")
        m.append("")
    if failed:
        h.append("<h2>Failed runs</h2><table><tr><th>run</th><th>cell</th><th>error</th></tr>")
        m.extend(["## Failed runs", "", "| run | cell | error |", "|---|---|---|"])
        for r in failed:
            c = r["config"]
            cell = f"{c.get('dataset')} {c.get('attack')} {c.get('defense')} seed {c.get('seed')}"
            err = (r.get("error") or "").splitlines()[0] if r.get("error") else ""
            h.append(f"<tr><td>{r['id'][:12]}</td><td>{html.escape(cell)}</td><td style='text-align:left'>{html.escape(err)}</td></tr>")
            m.append(_md_row([r["id"][:12], cell, err]))
        h.append("</table>")
    h.append("</body></html>")
    return "\n".join(h), "\n".join(m) + "\n", images


def write_report(store: ResultStore, out_dir: str | Path, frequency_files: tuple = (),
                 where: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    """`where`: only the runs it selects (`store.select_runs`), e.g. {"dataset": ["sst2"]}."""
    where = where or {}
    stored = store.runs()
    runs = select_runs(stored, where, store.path)
    # --defense lora alone would leave ΔCACC and time× without their baseline: plain fine-tuning's ok runs under
    # the other filters come along (said in the report), as the table's reference rows
    reference_added = False
    if "defense" in where and REFERENCE not in where["defense"] and "ok" in where.get("status", ["ok"]):
        # matched, not selected: a value fine-tuning lacks (a seed, a dataset it did not run) leaves the baseline
        # of the other values in place, where refusing it dropped every baseline
        others = {k: v for k, v in where.items() if k not in ("defense", "status")}
        refs = [r for r in stored if r["status"] == "ok" and r["config"].get("defense") == REFERENCE
                and matches(r, others)]
        runs = sorted(runs + refs, key=lambda r: r["created"])
        reference_added = bool(refs)
    page, md, images = build(runs, tuple(frequency_files), where, reference_added)  # everything checked before writing
    out = Path(out_dir)
    earlier = _linked_plots(out / "report.md")
    files = {out / "plots" / name: data for name, data in images.items()}
    files.update({out / "report.html": page.encode("utf-8"), out / "report.md": md.encode("utf-8")})
    write_whole(out, files, "report")
    for name in earlier - set(images):  # the earlier report's plot of a cell this one has not
        (out / "plots" / name).unlink(missing_ok=True)
    return out / "report.html", out / "report.md"


def _linked_plots(md: Path) -> set[str]:
    """The plots an earlier report in the folder wrote: those its report.md links, by the names build() gives
    them. Any other PNG in plots/, a user's own, stays, even one named like a report's (a copied
    `frequency_delta2.00.png` from `analyze frequency`)."""
    try:
        text = md.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {n for n in re.findall(r"\]\(plots/([^)/\\]+\.png)\)", text)
            if any(fnmatch.fnmatch(n, f) for f in PLOT_NAMES)}


PLOT_NAMES = ("asr_vs_cacc.png", "bars_*.png", "frequency_*.png")  # what build() names its images
