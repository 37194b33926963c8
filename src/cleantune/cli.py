"""The command line: a thin layer over the Python API. Option names match the API and config-file keys
(`--train-size` is `train_size` everywhere else)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

from .errors import UserError
from .store import RUN_FILTERS, strict_json

LIST_AXES = ("dataset", "attack", "defense", "seed")  # `run` takes comma lists here: the cross product runs


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other bad-input error
        raise UserError(message)


def _split(s: str, name: str) -> list[str]:
    """A comma list of the option `name`; an empty item ("badnets,,addsent", a trailing comma) is refused, as an
    empty string in a config file's list is, rather than dropped."""
    items = [x.strip() for x in s.split(",")]
    if not any(items):  # `--dataset ,` would run nothing and still create the store; `results --defense ''`
        raise UserError(f"--{name.replace('_', '-')} lists no value")  # read as an empty store
    if not all(items):
        raise UserError(f"--{name.replace('_', '-')} {s}: an empty item in the comma list")
    return items


def _option(s: str) -> tuple[str, object]:
    import yaml

    if "=" not in s:
        raise UserError(f"--option expects KEY=VALUE, got '{s}'")
    k, v = s.split("=", 1)
    if not v.strip():  # YAML reads an empty value as null, which would surface later as a type error
        raise UserError(f"--option {s}: no value (write {k.strip()}=null for none)")
    try:
        return k.strip().replace("-", "_"), yaml.safe_load(v)
    except yaml.YAMLError as e:
        raise UserError(f"--option {s}: cannot parse the value ({_parse_error(e)})") from None


def _parse_error(e: Exception) -> str:
    """A parser's message on one line. PyYAML's spans several: its context ("while parsing a flow sequence") first,
    and the problem with its line and column on later lines, which the first line alone lost."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(e).splitlines()[0]


def _options(items: list[str]) -> dict:
    """The command line's --option items; a key given twice (in either spelling) is refused, as in a config file
    (an --option over the config file's `options` is an override, not a repeat)."""
    out: dict = {}
    for s in items:
        k, v = _option(s)
        if k in out:
            raise UserError(f"--option {k} is given twice")
        out[k] = v
    return out


# the registry (defenses.DEFENSES) imports torch, which --help should not wait for; a test keeps the two equal
DEFENSE_NAMES = "finetune, lora, ga, ga-lora, lora-mslr, muscle-lora, btu, onion, strip, rap, bki, cube, abl"
STORE_HELP = "results store, a SQLite file (default: $XDG_DATA_HOME/cleantune/results.sqlite)"


def _add_run_options(p: argparse.ArgumentParser, lists: bool, store: bool = True) -> None:
    S = argparse.SUPPRESS
    many = " (comma list: each value runs)" if lists else ""
    p.add_argument("--config", help="YAML or TOML file of options (keys as below, with underscores)", default=S)
    p.add_argument("--dataset", default=S, help="sst2, hsol, agnews, olid" + many)
    p.add_argument("--attack", default=S, help="badnets, addsent, syntactic, style" + many)
    p.add_argument("--defense", default=S, help=DEFENSE_NAMES + many)
    p.add_argument("--seed", default=S, help="random seed" + many)
    p.add_argument("--model", default=S, help="backbone: 'minilm' (default), a local HF directory or a hub id")
    _add_training_options(p, S)
    p.add_argument("--train-size", type=int, default=S, help="seeded label-stratified subsample of train")
    p.add_argument("--rate", type=float, default=S, help="poison rate (default 0.1)")
    p.add_argument("--mode", default=S, help="dirty, clean or mix (default dirty)")
    p.add_argument("--target", default=S, help="target class: a class id or a label name of the dataset (default 1)")
    p.add_argument("--triggers", default=S, help="BadNets trigger words, comma-separated")
    p.add_argument("--num-triggers", type=int, default=S, help="BadNets triggers inserted per sample")
    p.add_argument("--sentence", default=S, help="AddSent trigger sentence")
    p.add_argument("--option", action="append", default=S, metavar="KEY=VALUE", help="a defense-specific setting")
    if store:
        p.add_argument("--store", default=S, help=STORE_HELP)


def _add_training_options(p: argparse.ArgumentParser, default=None) -> None:
    unset = " (default: the defense's; finetune: {})"
    p.add_argument("--epochs", type=int, default=default, help="training epochs" + unset.format(3))
    p.add_argument("--lr", type=float, default=default, help="peak learning rate" + unset.format("1.5e-4"))
    p.add_argument("--batch-size", type=int, default=default, help="samples per optimizer step" + unset.format(32))
    p.add_argument("--max-length", type=int, default=default, help="tokens per sample, longer ones truncated"
                   + unset.format(128))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="cleantune", description="Train clean models from backdoor-poisoned data.")
    parser.add_argument("--version", action="version", version=f"cleantune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="benchmark: dataset x attack x defense, stored and printed as a table")
    _add_run_options(p, lists=True)
    p.add_argument("--force", action="store_true", help="re-run configs that are already stored")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their last checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("train", help="train a defended model on your own data")
    p.add_argument("data", help=".tsv/.csv/.jsonl training file")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--config", help="YAML or TOML file of the options below (keys with underscores; "
                   "`options` holds defense options); the command line wins")
    p.add_argument("--dev", help="clean labelled dev file for model selection (without it: the last epoch)")
    p.add_argument("--text-column", help="default: sentence or text")
    p.add_argument("--label-column", help="default: label")
    p.add_argument("--defense", help=DEFENSE_NAMES + " (default: finetune)")
    p.add_argument("--model", help="backbone: 'minilm' (default), a local HF directory or a hub id")
    p.add_argument("--seed", type=int, help="default: 0")
    _add_training_options(p)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a defense-specific setting")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its last checkpoint")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="accuracy of a model on data, or its attack success rate with a trigger")
    p.add_argument("model", help="model directory (from `cleantune train` or any HF classifier)")
    p.add_argument("data", help="a .tsv/.csv/.jsonl file, or a benchmark name (its test split); classes are "
                   "matched to the model's by label name, by position where the model's labels are bare ids "
                   "(0..C-1 or LABEL_i)")
    p.add_argument("--text-column", help="a file's text column (default: sentence or text)")
    p.add_argument("--label-column", help="a file's label column (default: label)")
    p.add_argument("--attack", help="apply this trigger to the non-target samples and report ASR")
    p.add_argument("--triggers", help="BadNets trigger words (with --attack badnets)")
    p.add_argument("--num-triggers", type=int)
    p.add_argument("--sentence", help="AddSent sentence (with --attack addsent)")
    p.add_argument("--target", help="target class, with --attack: a label name, or a class id as DATA numbers "
                   "them (a benchmark's own ids, as in `run`; a file's labels: the model's) (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("sweep", help="run a grid file's cross product in parallel, resumably, into the store")
    p.add_argument("grid", help="grid file (.yaml/.toml): run options, lists are axes (see docs/sweep.md)")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--workers", type=int, default=1, help="runs at once (local backend: worker processes)")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address (--backend ray; default: start a local Ray)")
    p.add_argument("--cpus-per-run", type=int, help="torch threads per run (default: cores // workers; Ray: 1)")
    p.add_argument("--gpus-per-run", type=float, default=0, help="GPUs a Ray task asks for")
    p.add_argument("--dry-run", action="store_true", help="check the grid and list its cells; run nothing")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("report", help="HTML and Markdown report (tables, plots, protocol) from the store")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--out", default="report", help="output folder for report.html and report.md (default: ./report)")
    p.add_argument("--frequency", action="append", default=[], metavar="CURVES_JSON",
                   help="also plot these curves.json files of `cleantune analyze frequency`")
    _add_run_filters(p)

    p = sub.add_parser("scan", help="rank the tokens BTU's exposure stage finds suspicious in labelled data")
    p.add_argument("data", help="a labelled .tsv/.csv/.jsonl file, or a benchmark name (its train split)")
    p.add_argument("--text-column", help="a file's text column (default: sentence or text)")
    p.add_argument("--label-column", help="a file's label column (default: label)")
    p.add_argument("--attack", help="poison the benchmark's train split with this attack first (a check)")
    p.add_argument("--rate", type=float, help="poison rate, with --attack (default 0.1)")
    p.add_argument("--mode", help="poisoning mode, with --attack: dirty, clean or mix (default mix)")
    p.add_argument("--target", help="target class, with --attack: a label name or a class id (default 1)")
    p.add_argument("--triggers", help="BadNets trigger words (with --attack badnets)")
    p.add_argument("--sentence", help="AddSent sentence (with --attack addsent)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--top", type=int, help="tokens per exposure pass (default: the btu defense's k, 0.0005 x "
                   "vocabulary size; with --faithful 17)")
    p.add_argument("--batch-size", type=int, help="shallow passes' batch (default: BTU's 256, or less so that a "
                   "pass makes at least 25 optimizer steps)")
    p.add_argument("--passes", default="AB", help="exposure passes: A (shallow), B (A's tokens removed: B "
                   "without A still runs A, unlisted), C (full model, slow); listed in this order; default AB")
    p.add_argument("--faithful", action="store_true", help="official BTU code's exposure (pools over padding, "
                   "substring removal in pass B)")
    p.add_argument("--show-samples", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="print up to N samples containing each token (default 3; after DATA, or with N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("analyze", help="analyses of training dynamics")
    analyses = p.add_subparsers(dest="analysis", required=True, parser_class=_Parser)
    q = analyses.add_parser("frequency", help="low/high-frequency relative errors of the clean and backdoor "
                                              "mappings during training (MuScleLoRA's Fourier analysis)",
                            description="Records the curves while the defended model trains. Defenses: finetune, "
                                        "lora, ga, ga-lora, lora-mslr, muscle-lora, and bki and cube (their final "
                                        "training, on the data they kept). strip, rap, onion, btu and abl are "
                                        "refused: their model is plain fine-tuning behind a filter or an edit "
                                        "(use finetune), or several trainings (abl).")
    _add_run_options(q, lists=False, store=False)  # the analysis writes its --out folder, not the store
    q.add_argument("--out", required=True, help="folder for curves.json and the PNG plots")
    q.add_argument("--every", type=int, default=5, help="record every N optimizer steps (default 5)")
    q.add_argument("--samples", type=int, help="subsample each dev set to N samples (faster on CPU)")
    q.add_argument("--distance", choices=("raw", "median"), default="raw",
                   help="kernel distances as published (raw) or divided by their median")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted analysis from its last epoch's checkpoint (in <out>.work)")
    q.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("results", help="the stored runs")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _add_run_filters(p)
    return parser


def _add_run_filters(p: argparse.ArgumentParser) -> None:
    for key in RUN_FILTERS:
        what = "ok or failed" if key == "status" else f"the {key} `run` was given"
        p.add_argument(f"--{key}", help=f"only runs with this {key} ({what}; comma-separated: any of them)")


def _run_filters(ns) -> dict[str, list[str]]:
    where = {k: _split(getattr(ns, k), k) for k in RUN_FILTERS if getattr(ns, k) is not None}
    if "seed" in where:
        where["seed"] = [str(_int("seed", v)) for v in where["seed"]]
    if "model" in where:  # as `run` records it: a local folder by its absolute path, short names as they are
        from .models import model_name

        where["model"] = [model_name(v) for v in where["model"]]
    return where


# ---------------------------------------------------------------- config files


def load_config_file(path: str, label: str | None = None) -> dict:
    label = label or f"--config {path}"  # how error messages name the file
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{label}: " + ("not a file" if p.exists() else "no such file"))  # a folder, say
    try:
        text = p.read_text(encoding="utf-8-sig")  # a BOM: TOML reads it as a stray statement
    except UnicodeDecodeError as e:
        raise UserError(f"{label}: not UTF-8 text (byte {e.start})") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = _load_yaml(text) or {}
        else:
            raise UserError(f"{label}: use a .yaml, .yml or .toml file")
    except UserError:
        raise
    except Exception as e:  # yaml and tomllib raise their own error types
        raise UserError(f"{label}: cannot parse ({_parse_error(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a mapping of option names to values")
    odd = next((k for k in data if not isinstance(k, str)), None)  # YAML reads `1: 2` as an int key
    if odd is not None:
        raise UserError(f"{label}: unknown key {odd!r} (option names are words)")
    _one_spelling(data, label, "")
    for k, v in data.items():
        _check_plain(v, k, None, label)
    return data


def _load_yaml(text: str):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last without a word."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given beside it override its
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool):  # SafeLoader refuses what cannot be a key
                    continue
                if key in keys:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)  # the line: _parse_error
                keys.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=Loader)


def _one_spelling(mapping: dict, label: str, where: str) -> None:
    spelled: dict[str, str] = {}
    for k in mapping:  # batch_size and batch-size are one option: which value was meant?
        first = spelled.setdefault(k.replace("-", "_"), k)
        if first != k:
            raise UserError(f"{label}: '{first}' and '{k}'{where} set the same option")


def _check_plain(value, key: str, parent: str | None, label: str) -> None:
    """YAML and TOML also read dates and times, and YAML `!!binary` and `!!set`: no option takes one, and
    `train` passes its `options` on as JSON, which fails on them. A key's own value (or list of values) is
    left to the command's check of its type, which says what the key takes."""
    if isinstance(value, dict):
        odd = next((k for k in value if not isinstance(k, str)), None)
        if odd is not None:
            raise UserError(f"{label}: unknown key {odd!r} in '{key}' (option names are words)")
        _one_spelling(value, label, f" in '{key}'")
        for k, v in value.items():
            _check_plain(v, k, key, label)
    elif isinstance(value, list):
        for v in value:
            _check_plain(v, key, parent, label)
    elif parent is not None and value is not None and not isinstance(value, (str, int, float)):  # bool is an int
        raise UserError(f"{label}: '{key}' in '{parent}' expects a string, number, true or false, list or mapping, "
                        f"got {value!r}")


def _run_options(ns: argparse.Namespace, store: bool = True) -> dict:
    from .options import check_values
    from .runner import RunConfig

    known = {f.name for f in fields(RunConfig)} | ({"store"} if store else set())
    opts: dict = {}
    if "config" in ns:
        for k, v in load_config_file(ns.config).items():
            key = k.replace("-", "_")
            if key not in known:
                raise UserError(f"--config {ns.config}: unknown key '{k}'")
            opts[key] = v
        # a wrong type is named with the file it came from (an axis may be a list: checked per value, the
        # seeds later by _int, as the command line's)
        label = f"--config {ns.config}"
        check_values(RunConfig, {k: v for k, v in opts.items() if k not in LIST_AXES}, label, {"store": str | None})
        for axis in ("dataset", "attack", "defense"):
            for v in _as_list(opts[axis], axis) if axis in opts else []:
                check_values(RunConfig, {axis: v}, label)
    cli = {k: v for k, v in vars(ns).items() if k in known or k == "option"}
    ns.config_keys = set(opts) - set(cli)
    given = _options(cli.pop("option", []))
    if isinstance(opts.get("options"), dict):
        ns.config_options = {str(k).replace("-", "_") for k in opts["options"]} - set(given)
    if given:
        opts.setdefault("options", {}).update(given)
    opts.update(cli)
    return opts


def _as_list(v, name: str) -> list:
    if isinstance(v, list):
        return v
    return _split(v, name) if isinstance(v, str) else [v]


def _int(name: str, v) -> int:
    from .options import coerce

    try:
        return coerce(v, int)  # a CLI string or a config value; 1.5 is refused
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')}: expected an integer, got '{v}'") from None


def _attack_options(ns) -> dict:
    """eval's and scan's trigger options: each must fit --attack, and none may come without it."""
    from .runner import ATTACK_OPTIONS, check_attack_option

    for k, default in (("rate", 0.1), ("mode", "mix"), ("target", 1)):  # poisoning settings of eval and scan
        if getattr(ns, k, None) is not None and ns.attack is None:
            raise UserError(f"--{k} needs --attack")
        if hasattr(ns, k) and getattr(ns, k) is None and ns.attack is not None:
            setattr(ns, k, default)
    given = {k: getattr(ns, k, None) for k in ATTACK_OPTIONS}
    given = {k: (_split(v, k) if k == "triggers" else v) for k, v in given.items() if v is not None}
    for k in given:
        if ns.attack is None:
            raise UserError(f"--{k.replace('_', '-')} needs --attack")
        check_attack_option(k, [ns.attack])
    return given


# ---------------------------------------------------------------- commands


def cmd_run(ns) -> int:
    import itertools

    from .runner import ATTACK_OPTIONS, RunConfig, check_attack_option, resumable, run
    from .store import ResultStore

    opts = _run_options(ns)
    store_path = opts.pop("store", None)
    axes = {a: _as_list(opts.pop(a), a) if a in opts else [getattr(RunConfig, a)] for a in LIST_AXES}
    empty = next((a for a, values in axes.items() if not values), None)
    if empty:  # a config file's empty list
        raise UserError(f"--{empty} lists no value")
    axes["seed"] = [_int("seed", s) for s in axes["seed"]]
    if "triggers" in opts:
        opts["triggers"] = _as_list(opts["triggers"], "triggers")
    for opt in ATTACK_OPTIONS:  # attack-specific options go to the cells they apply to
        if opt in opts:
            check_attack_option(opt, axes["attack"])
    configs, seen = [], set()
    for dataset, attack, defense, seed in itertools.product(*axes.values()):
        cell = {k: v for k, v in opts.items() if k not in ATTACK_OPTIONS or attack in ATTACK_OPTIONS[k]}
        try:
            config = RunConfig(dataset=dataset, attack=attack, defense=defense, seed=seed, **cell)
        except TypeError as e:
            raise UserError(str(e)) from None
        # every cell is checked before the first one trains; a value listed twice (`--seed 0,0`), or two
        # spellings of one setting, are one cell, as in a sweep
        key = config.run_id()
        if key not in seen:
            seen.add(key)
            configs.append(config)
    from .evaluate import one_class_note
    from .store import default_store_path
    from .training import is_main_process

    main = is_main_process()  # the processes of an `accelerate launch` run each cell together; one speaks
    new_store = not Path(store_path or default_store_path()).exists()
    store = ResultStore(store_path)
    results = []
    try:
        for config in configs:
            if ns.resume and main and not resumable(config, store, ns.force):
                # a run with other settings or data has another id, so its checkpoints are not this one's
                print(f"note: --resume: no checkpoint of {config.dataset} {config.attack} {config.defense} "
                      f"seed={config.seed} with these settings; training it from the start", file=sys.stderr)
            r = run(config, store, force=ns.force, resume=ns.resume, progress=not ns.no_progress)
            results.append(r)
            note = one_class_note(f"{config.dataset} {config.attack} {config.defense} seed={config.seed}",
                                  r["metrics"])
            if main and note:
                print(note, file=sys.stderr)
            if main and ns.format == "table" and len(configs) > 1:
                m = r["metrics"]
                print(f"[{len(results)}/{len(configs)}] {config.dataset} {config.attack} {config.defense} "
                      f"seed={config.seed}: CACC {m['cacc']:.4f} ASR {m['asr']:.4f}"
                      f"{' (stored)' if r.get('reused') else ''}", file=sys.stderr)
    except BaseException:  # an error the checks could not foresee (a hub id offline): no empty store left
        if main and new_store:
            store.discard_if_empty()
        raise
    if not main:
        return 0
    if ns.format == "json":
        # `reused`: taken from the store, not trained again (the table's note)
        print(strict_json([{**{k: r[k] for k in ("id", "config", "metrics", "timings")}, "reused": bool(r.get("reused"))}
                           for r in results], indent=1))
    else:
        print(format_table(results))
        reused = sum(bool(r.get("reused")) for r in results)
        if reused:  # a stored result comes back in a second: say that nothing trained
            print(f"{reused} of {len(results)} run(s) taken from the store, "
                  "not trained again (--force re-runs)")
        print(f"store: {store.path}")
    return 0


TRAIN_CONFIG = {"dev": str, "text_column": str, "label_column": str, "defense": str, "model": str, "seed": int,
                "epochs": int, "lr": float, "batch_size": int, "max_length": int, "options": dict}
TRAIN_DEFAULTS = {"text_column": "auto", "label_column": "label", "defense": "finetune", "seed": 0}


def _train_config(ns) -> None:
    """Fill `train`'s options from --config where the command line left them unset, then the defaults."""
    from .options import coerce

    _options(ns.option)  # before the config file's options join them
    given = load_config_file(ns.config) if ns.config else {}
    ns.config_keys = set()
    for k, v in given.items():
        key = k.replace("-", "_")
        if key not in TRAIN_CONFIG:
            raise UserError(f"--config {ns.config}: unknown key '{k}' (keys: {', '.join(TRAIN_CONFIG)})")
        try:
            v = coerce(v, TRAIN_CONFIG[key])
        except (TypeError, ValueError):
            raise UserError(f"--config {ns.config}: '{k}' expects {TRAIN_CONFIG[key].__name__}, got {v!r}") from None
        if key == "options":
            ns.config_options = {o.replace("-", "_") for o in v} - {_option(s)[0] for s in ns.option}
            ns.option = [f"{o}={json.dumps(x)}" for o, x in v.items()] + ns.option  # --option wins
        elif getattr(ns, key) is None:
            setattr(ns, key, v)
            ns.config_keys.add(key)
    for k, v in TRAIN_DEFAULTS.items():
        if getattr(ns, k) is None:
            setattr(ns, k, v)


def _kept_line(defense, model, dev) -> str:
    """Which epoch the saved model is, and its dev accuracy where there is a dev set."""
    hist = defense.report_.history
    # a diverged epoch is never kept; a later stage's epochs (ABL's unlearning) are not the training's
    finished = [h["epoch"] for h in hist if "diverged_at_step" not in h and "stage" not in h]
    dev_accs = [h["dev_acc"] for h in hist if "dev_acc" in h]
    if not finished:  # nothing trained here: an inference-time defense given an already trained victim
        kept = "epoch kept: none (no training)"
    elif dev is not None and dev_accs:
        from .evaluate import evaluate
        from .models import Classifier

        # The selection score is on the samples the defense selects with (ga and muscle-lora hold out their GA
        # references) and before its later stages (btu's unlearning, abl's): it can be far from the saved
        # model's. The line gives what `cleantune eval OUT DEV` reports: the saved model alone, so an
        # inference-time defense's filter (STRIP's perturbations, ONION's LM) neither runs nor counts here.
        saved = Classifier(model.model, model.tokenizer, model.label_names, model.max_length)
        selected, acc = f"{max(dev_accs):.4f}", f"{evaluate(saved, dev)['cacc']:.4f}"
        best = f"{defense.report_.best_epoch} (counting from 0)"  # as the store, the report and --resume number them
        kept = (f"epoch kept: {best}, dev accuracy {acc}" if selected == acc else
                f"epoch kept: {best} (selection accuracy {selected}), dev accuracy {acc}")
    else:
        kept = (f"epoch kept: {finished[-1]} (counting from 0), {'no --dev: ' if dev is None else ''}"
                "last finished epoch")
    return kept


def cmd_train(ns) -> int:
    from .data import read_dataset
    from .defenses import get_defense

    _train_config(ns)
    train_data = read_dataset(ns.data, ns.text_column, ns.label_column)
    if len(set(train_data.labels)) < 2:
        raise UserError(f"{ns.data}: every sample has label '{train_data.label_names[train_data.labels[0]]}'; "
                        f"a classifier needs at least two classes")
    dev = read_dataset(ns.dev, ns.text_column, ns.label_column, train_data.label_names) if ns.dev else None
    from .runner import refuse_own_settings
    from .training import OWN_SETTINGS

    opts = dict(_option(s) for s in ns.option)
    refuse_own_settings(opts)
    opts.update({k: getattr(ns, k) for k in OWN_SETTINGS if getattr(ns, k) is not None})
    defense = get_defense(ns.defense, **opts)
    defense.check_task(train_data.num_labels)
    defense.check_backbone(train_data.num_labels)  # as `run` does: before any weights load or folder is made
    if dev is not None:  # without one, a defense that needs it says so in fit, before it loads anything
        defense.check_dev(len(dev))
    from .models import check_out_dir
    from .training import has_checkpoint, is_main_process, work_lock

    check_out_dir(ns.out, siblings=(".partial", ".old", ".work"))  # the string: Path("") would be "."
    out = Path(ns.out)
    if Path(defense.model).is_dir() and Path(defense.model).resolve() == out.resolve():
        # a saved adapter names its base model's folder, which would then hold the merged model: applied on top
        # of it, the adapter would act twice
        raise UserError(f"--out {ns.out}: that is the --model folder, which the trained model would replace; "
                        "write it to another folder")
    work = out.with_name(out.name + ".work")  # checkpoints for --resume, removed once the model is saved
    if ns.resume and is_main_process() and not has_checkpoint(work):
        print(f"note: --resume: no checkpoint in {work}; training from the start", file=sys.stderr)
    with work_lock(work, wait=False):  # one `train` per --out at a time
        model = defense.fit(train_data, dev, out_dir=work, resume=ns.resume, progress=not ns.no_progress)
        if not is_main_process():
            return 0
        try:
            model.save_pretrained(out)
        except UserError as e:  # --out changed while training; the checkpoints in <out>.work stay for --resume
            raise UserError(re.sub(r"^out_dir\b", "--out", str(e))
                            + f" (the trained model's checkpoint stays in {work}: --resume after fixing --out)") from None
        # before the checkpoints go: interrupted during the dev evaluation, --resume finds them and saves again
        kept = _kept_line(defense, model, dev)
        shutil.rmtree(work, ignore_errors=True)
    if defense.at_inference:
        print(f"note: {ns.defense} acts at inference time; {out} holds the trained victim without it "
              f"(its defended predictions: `cleantune run` or the Python API)", file=sys.stderr)
    print(f"saved {out} (defense {ns.defense}, {len(train_data)} samples, labels {train_data.label_names}, "
          f"{defense.report_.processes} process(es), {kept})")
    found = defense.findings()
    if found:
        print(f"{ns.defense}: {found}")
    return 0


def _check_data_file(data: str) -> None:
    """DATA of eval and scan, where it names no benchmark: a missing file is told apart from a typo of one."""
    from .data import BENCHMARKS

    if not Path(data).is_file():
        what = "not a file" if Path(data).exists() else "no such file"  # a folder, /dev/null
        raise UserError(f"{data}: {what} (and not a benchmark name: {', '.join(BENCHMARKS)})")


def cmd_eval(ns) -> int:
    import random

    from .attacks import get_attack
    from .attacks.base import check_target
    from .data import BENCHMARKS, load_benchmark, read_dataset, target_id
    from .evaluate import evaluate, label_mapping
    from .models import Classifier, check_model_folder

    extra = _attack_options(ns)
    if ns.data in BENCHMARKS:
        for option in ("text_column", "label_column"):
            if getattr(ns, option) is not None:
                raise UserError(f"--{option.replace('_', '-')} applies to files; benchmark {ns.data} has fixed columns")
    check_model_folder(ns.model)
    model = Classifier.from_pretrained(ns.model)
    bench = None
    if ns.data in BENCHMARKS:
        bench = load_benchmark(ns.data)
        data = bench.test
    else:  # a file's labels are read as the model's names (or its ids, where its names are ids)
        _check_data_file(ns.data)
        data = read_dataset(ns.data, ns.text_column or "auto", ns.label_column or "label", model.label_names)
    if ns.attack:  # in DATA's numbering, as the trigger is drawn; evaluate() renumbers to the model's by name
        target = target_id(ns.target, data.label_names, ns.data)
        check_target(target, data.num_labels, ns.data)
    label_mapping(data.label_names, model.label_names, ns.data)  # classes that do not match: refused before any work
    triggered = None
    if ns.attack:
        attack = get_attack(ns.attack, target=target, seed=ns.seed, **extra)
        if bench is not None:
            attack.prepare(bench)
        elif ns.attack in ("syntactic", "style"):
            raise UserError(f"--attack {ns.attack} needs a benchmark name as DATA (its paraphrase tables)")
        triggered = attack.triggered_set(data, random.Random(f"eval-{ns.seed}"), "test")
    from .training import is_main_process

    # under `accelerate launch` each process scores its share of DATA, and one prints
    m = evaluate(model, data, triggered, None if ns.no_progress else "eval", shard=True)
    if not is_main_process():
        return 0
    out = {"n": len(data), "accuracy": m["cacc"]}
    if triggered is not None:
        out.update({"target": data.label_names[target], "n_triggered": len(triggered), "asr": m["asr"],
                    "asr_floor": m["asr_floor"]})
    if ns.format == "json":
        print(strict_json(out))
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    return 0


SCAN_COLUMNS = ("rank", "pass", "pass_rank", "token", "id", "drift", "doc_freq", "label", "label_share")


def cmd_scan(ns) -> int:
    from .attacks import get_attack
    from .data import BENCHMARKS, load_benchmark, read_dataset, target_id
    from .defenses.btu import scan, scan_batch_size

    if not ns.passes or any(c not in "ABC" for c in ns.passes) or len(set(ns.passes)) != len(ns.passes):
        raise UserError(f"--passes must be letters from A, B, C without repeats, got '{ns.passes}'")
    if ns.top is not None and ns.top < 1:
        raise UserError(f"--top must be at least 1, got {ns.top}")
    if ns.show_samples < 0:
        raise UserError(f"--show-samples must be at least 0, got {ns.show_samples}")
    extra = _attack_options(ns)
    if ns.data in BENCHMARKS:
        for option in ("text_column", "label_column"):  # else ignored without a word
            if getattr(ns, option) is not None:
                raise UserError(f"--{option.replace('_', '-')} applies to files; benchmark {ns.data} has fixed columns")
        bench = load_benchmark(ns.data)
        data = bench.train
        if ns.attack:
            target = target_id(ns.target, bench.label_names, ns.data)  # a name, as eval takes it
            data = get_attack(ns.attack, rate=ns.rate, mode=ns.mode, target=target, seed=ns.seed,
                              **extra).apply(bench).train.without_flags()
    else:
        if ns.attack:
            raise UserError(f"--attack needs a benchmark name as DATA ({', '.join(BENCHMARKS)}), got '{ns.data}'")
        _check_data_file(ns.data)
        data = read_dataset(ns.data, ns.text_column or "auto", ns.label_column or "label")
    if data.num_labels < 2:
        raise UserError(f"{ns.data}: needs at least two labels to expose a backdoor, found {data.num_labels}")
    from .training import is_main_process, num_processes, steps_per_epoch

    world = num_processes()
    batch_size = ns.batch_size if ns.batch_size is not None else scan_batch_size(len(data))  # scan() checks it
    rows = scan(data, ns.model, k=ns.top, passes=ns.passes, faithful=ns.faithful, seed=ns.seed,
                samples=ns.show_samples, progress=not ns.no_progress, batch_size=batch_size)
    if not is_main_process():  # the processes of an `accelerate launch` train the passes together; one prints
        return 0
    if ns.format == "json":
        print(strict_json(rows, indent=1))
    elif ns.format == "csv":
        buf = io.StringIO()
        cols = list(SCAN_COLUMNS) + (["samples"] if ns.show_samples else [])
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            # a JSON list, as results' csv holds the config: any separator could occur inside a text
            w.writerow(r | ({"samples": json.dumps(r["samples"], ensure_ascii=False)} if ns.show_samples else {}))
        print(buf.getvalue(), end="")
    else:
        table = [["rank", "pass", "token", "drift", "doc_freq", "label_skew"]] + [
            [str(r["rank"]), f"{r['pass']}{r['pass_rank']}", r["token"], f"{r['drift']:.3g}", str(r["doc_freq"]),
             f"{r['label_share']:.2f} {r['label']}"] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for n, row in enumerate(table):
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
            if n == 0:
                print("  ".join("-" * w for w in widths))
            elif ns.show_samples:
                for t in rows[n - 1]["samples"]:  # a text may hold line breaks: its later lines are indented
                    print("      | " + "\n      |   ".join(t.splitlines() or [""]))
    steps = steps_per_epoch(len(data), batch_size, world)
    few = " (too few for the drift to separate tokens: use a smaller --batch-size)" if steps < 10 else ""
    if world > 1:
        batch_size = f"{batch_size} per process x {world}"
    if "C" in ns.passes:  # the whole model, trained as the defense's victim is: at the defense's batch
        from .defenses import BTU

        batch_size = f"{batch_size} (pass C: {BTU(btu_mode='faithful' if ns.faithful else 'default').batch_size})"
    if ns.format == "table":
        print(f"{len(data)} samples; passes {ns.passes}, batch {batch_size}, {steps} optimizer step(s) per pass{few}"
              "; drift = L2 distance of the token's embedding from the pretrained one; label_skew = share of "
              "samples containing the token that carry its most common label")
    elif few:  # json and csv keep stdout parseable: the warning goes to stderr
        print(f"cleantune: note: batch {batch_size}, {steps} optimizer step(s) per pass{few}", file=sys.stderr)
    return 0


RESULT_COLUMNS = ("id", "dataset", "attack", "defense", "model", "seed", "train_size", "epochs", "rate", "mode",
                  "mixed_precision", "cacc", "asr", "asr_floor", "det_precision", "det_recall", "wall_s",
                  "samples_per_s", "status")


# `results --format csv` adds these after the table's columns (so scripts reading the table's by position still
# work): the settings and measurements a paper table needs, and the whole resolved config as JSON
CSV_EXTRA = ("lr", "batch_size", "max_length", "target", "best_epoch", "n_train", "n_poisoned", "train_s", "eval_s",
             "tokens_per_s", "peak_memory_mb", "created", "config", "error")


def _csv_row(r: dict) -> dict:
    c, m, t = r["config"], r.get("metrics") or {}, r.get("timings") or {}
    return _flat(r) | {"id": r["id"], "lr": c.get("lr"), "batch_size": c.get("batch_size"),
                       "max_length": c.get("max_length"), "target": c.get("target"),
                       **{k: m.get(k) for k in ("best_epoch", "n_train", "n_poisoned")},
                       **{k: t.get(k) for k in ("train_s", "eval_s", "tokens_per_s", "peak_memory_mb")},
                       "created": r.get("created"), "config": json.dumps(c, sort_keys=True), "error": r.get("error")}


def _flat(r: dict) -> dict:
    """One table row. det_* are the defense's detection scores where it flags samples: training samples it
    removed, else test inputs it rejected."""
    c, m, t = r["config"], r.get("metrics") or {}, r.get("timings") or {}
    det = m.get("train_detection") or m.get("test_detection") or {}
    return {"id": r["id"][:12], **{k: c.get(k) for k in RESULT_COLUMNS if k in c},
            "cacc": m.get("cacc"), "asr": m.get("asr"), "asr_floor": m.get("asr_floor"),
            "det_precision": det.get("precision"), "det_recall": det.get("recall"), "wall_s": t.get("wall_s"),
            "samples_per_s": t.get("samples_per_s"), "status": r.get("status", "ok")}


def format_table(runs: list[dict]) -> str:
    from .report import _variant_rows

    rows = [_flat(r) for r in runs]
    if not rows:
        return "(no runs)"
    # runs of one defense that differ in a setting the columns leave out (lr, an option) are told apart as the
    # report's rows are: `lora (lr=0.001)`. The report labels its successful runs, so a failed run's setting does
    # not relabel them here either; a failed run is labelled as it would be among them.
    ok = [r for r in runs if r.get("status", "ok") == "ok"]
    labels = _variant_rows(ok)
    tables = defaultdict(list)  # a row's label reads only its dataset's runs
    for r in ok:
        tables[r["config"]["dataset"]].append(r)
    for r in runs:
        if r["id"] not in labels:
            labels[r["id"]] = _variant_rows(tables[r["config"]["dataset"]] + [r])[r["id"]]
    for row, r in zip(rows, runs):
        row["defense"] = labels[r["id"]][1]
    cols = [c for c in RESULT_COLUMNS if any(row.get(c) is not None for row in rows)]

    def cell(c, v):  # one format per column, so a column's numbers line up
        if v is None or v != v:  # undefined (NaN: a floor or recall without samples to measure it), as the report's –
            return "-"
        if not isinstance(v, float):
            return str(v)
        return f"{v:.1f}" if c in ("wall_s", "samples_per_s") else f"{v:g}" if c == "rate" else f"{v:.4f}"

    table = [[c.upper() if c in ("cacc", "asr") else c for c in cols]] + [[cell(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def cmd_sweep(ns) -> int:
    from .store import ResultStore
    from .sweep import check_options, load_grid, sweep

    cells = load_grid(ns.grid)
    check_options(ns.workers, ns.backend, ns.address, ns.cpus_per_run, ns.gpus_per_run)  # --dry-run checks them too
    if ns.dry_run:  # reads the store, creates nothing
        from .store import check_creatable, store_path

        path = store_path(ns.store)
        # a store that does not exist yet holds nothing; one the sweep could not create is refused here too
        if not path.exists():
            check_creatable(path, f"--store {path}")
        stored = ResultStore(path, readonly=True).stored_ids() if path.exists() else set()
        shown = ("dataset", "attack", "defense", "seed")

        def four(c):
            return tuple(getattr(c.config, k) for k in shown)

        alike: dict[tuple, list] = {}
        for c in cells:
            alike.setdefault(four(c), []).append(c)
        for c in cells:
            # the settings that tell this cell from others with the same four (an lr axis, a defense option's)
            group = alike[four(c)]
            varying = sorted(k for k in c.resolved if k not in shown
                             and len({json.dumps(g.resolved.get(k), sort_keys=True) for g in group}) > 1)
            extra = "".join(f" {k}={c.resolved[k]}" for k in varying)
            print(f"{'stored' if c.id in stored else 'to run':7} {c.id[:12]}  {c.config.dataset} {c.config.attack} "
                  f"{c.config.defense} seed={c.config.seed}{extra}")
        print(f"{len(cells)} cells, {sum(c.id in stored for c in cells)} stored")
        return 0
    s = sweep(cells, ns.store, workers=ns.workers, backend=ns.backend, address=ns.address,
              cpus_per_run=ns.cpus_per_run, gpus_per_run=ns.gpus_per_run, progress=not ns.no_progress)
    store = ResultStore(ns.store)
    print(format_table([r for r in (store.get(c.id) for c in cells) if r is not None]))
    print(f"{len(cells)} cells: {s.skipped} already stored, {s.ran} run ({len(s.failed)} failed) in {s.seconds:.0f} s; "
          f"store: {store.path}")
    if s.failed:
        print("failed runs keep their error in the store (cleantune results --format json); "
              "the next sweep retries them", file=sys.stderr)
    return 1 if s.failed else 0


def cmd_report(ns) -> int:
    from .models import check_out_dir
    from .report import write_report
    from .store import ResultStore

    check_out_dir(ns.out, "report.md", "cleantune report", siblings=())
    store = ResultStore(ns.store, readonly=True)
    for f in ns.frequency:
        if not Path(f).is_file():
            raise UserError(f"--frequency {f}: " + ("not a file" if Path(f).exists() else "no such file"))
    html, md = write_report(store, ns.out, ns.frequency, _run_filters(ns))
    print(f"wrote {html} and {md}")
    return 0


def cmd_results(ns) -> int:
    from .store import ResultStore, select_runs

    store = ResultStore(ns.store, readonly=True)
    runs = select_runs(store.runs(), _run_filters(ns), store.path)
    if ns.format == "json":
        print(strict_json(runs, indent=1))
    elif ns.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(RESULT_COLUMNS) + list(CSV_EXTRA))
        w.writeheader()
        for r in runs:
            w.writerow(_csv_row(r))
        print(buf.getvalue(), end="")
    else:
        print(format_table(runs))
    return 0


def _step_or_never(step: int | None) -> str:
    return "never (not in the recorded steps)" if step is None else str(step)


def cmd_analyze(ns) -> int:
    from . import frequency
    from .runner import RunConfig

    opts = _run_options(ns, store=False)
    if "seed" in opts:
        opts["seed"] = _int("seed", opts["seed"])
    if "triggers" in opts:
        opts["triggers"] = _as_list(opts["triggers"], "triggers")
    try:
        config = RunConfig(**opts)
    except TypeError as e:
        raise UserError(str(e)) from None
    from .models import check_out_dir
    from .training import has_checkpoint, is_main_process, work_lock

    frequency.check_defense(config.defense)  # before resolve() loads the benchmark
    frequency.check_settings(ns.every, ns.samples, ns.distance)
    config.resolve()
    check_out_dir(ns.out, "curves.json", "frequency analysis", siblings=(".work",))
    out = Path(ns.out)
    work = out.with_name(out.name + ".work")  # checkpoints for --resume, removed once the curves are written
    main = is_main_process()  # the processes of an `accelerate launch` train together; the main one writes and speaks
    if ns.resume and main and not has_checkpoint(work):
        print(f"note: --resume: no checkpoint in {work}; training from the start", file=sys.stderr)
    with work_lock(work, wait=False):  # one analysis per --out at a time
        r = frequency.analyze(config, ns.out, every=ns.every, samples=ns.samples, distance=ns.distance,
                              progress=not ns.no_progress, work_dir=work, resume=ns.resume)
        if main:
            shutil.rmtree(work, ignore_errors=True)
    if not main:
        return 0
    m = r["metrics"]
    print(f"{config.dataset} {config.attack} {config.defense}: CACC {m['cacc']:.4f} ASR {m['asr']:.4f}")
    for name, meta in r["sets"].items():
        print(f"{name}: {meta['n']} samples, median input distance {meta['median_distance']:.1f}, "
              f"e_low (delta {r['deltas'][0]:g}) first below 0.5 at step {_step_or_never(r['first_step_e_low_below_0.5'][name])}")
    print(f"curves: {Path(ns.out) / 'curves.json'}")
    for path in r["plots"]:
        print(f"plot: {path}")
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "eval": cmd_eval, "scan": cmd_scan, "analyze": cmd_analyze,
            "sweep": cmd_sweep, "report": cmd_report, "results": cmd_results}


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """cleantune's own warnings as one line, like its errors; other libraries' as Python prints them."""
    if _other_process():  # a launch's processes run the same code on the same data: the main one's warnings say it
        return
    if str(filename).startswith(os.path.dirname(__file__) + os.sep):
        _say(f"cleantune: warning: {message}")
    else:
        _default(message, category, filename, lineno, file, line)


# what an interrupted command keeps, said where the user would otherwise start over
_WITH_RESUME = " (the same command with --resume continues from the last finished epoch's checkpoint, if any)"
RESUME_HINT = {"run": _WITH_RESUME, "train": _WITH_RESUME, "analyze": _WITH_RESUME,
               "sweep": " (the same command skips the stored cells and resumes the started ones)"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `timeout`, `kill`) as an interruption: the clean-up that Ctrl-C
    gets (locks released, half-written outputs removed, workers stopped) runs for it too."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    ns = None
    # Only the main thread may set a handler. One that ignores SIGTERM (a caller's choice) stays, and the
    # caller's handler comes back when main returns.
    previous = signal.getsignal(signal.SIGTERM)
    own = threading.current_thread() is threading.main_thread() and previous is not signal.SIG_IGN
    if own:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        ns = build_parser().parse_args(argv)
        rank, processes = _launched()
        if ns.command == "sweep" and processes > 1:  # each process would run the whole grid in workers of its own
            raise UserError("cleantune sweep runs its cells in processes of its own (--workers, --backend ray): "
                            "start it without accelerate launch, or launch `cleantune run` for each cell")
        if ns.command in ("results", "report") and rank != 0:  # the main process prints, and writes the report
            return 0
        if ns.command not in ("results", "report"):  # those two only read the store: no torch import
            from .models import silence_transformers
            from .training import flush_subnormals

            flush_subnormals()
            silence_transformers()
        code = COMMANDS[ns.command](ns)
        sys.stdout.flush()  # here, not at exit, so a reader that left shows up as the BrokenPipeError below
        return code
    except UserError as e:
        _say(f"cleantune: error: {_name_config_file(ns, str(e))}")
        return 2
    except KeyboardInterrupt as e:
        what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)  # 128 + the signal
        _say(f"cleantune: {what}{RESUME_HINT.get(getattr(ns, 'command', None), '')}")
        return code
    except (MemoryError, RuntimeError) as e:  # torch's allocators raise RuntimeError subclasses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _peer_left(e):
            _say("cleantune: error: another process of this launch stopped (its message is above), so this one "
                 "stopped too")
            return 2
        if not isinstance(e, MemoryError) and not ("out of memory" in first or "can't allocate memory" in first):
            raise
        _say(f"cleantune: error: out of memory ({first[:200]}); lower --batch-size or --max-length, or the "
             f"defense's sizes")
        return 2
    except BrokenPipeError:
        if not _stdout_gone():  # another pipe (a worker's) broke: a real failure
            raise
        # The reader of stdout left (`cleantune results | head`): stop quietly, as the Python docs advise,
        # pointing stdout at devnull so the interpreter's final flush of what is buffered cannot fail again.
        # 141 (128 + SIGPIPE) is the status a shell reports for cat, grep and the like killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if own:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        # Under `accelerate launch` the process group's gloo threads must stop before the interpreter exits: a
        # process leaving with them alive aborts ("terminate called without an active exception"), about one
        # exit in four on this machine, and the launcher reports the launch as failed
        dist = _process_group()
        if dist is not None:
            dist.destroy_process_group()


def _name_config_file(ns, message: str) -> str:
    """A check names the setting by its flag; where --config set it, the message names the file and key
    instead (`--rate must be ...` becomes `--config c.yaml: 'rate' must be ...`)."""
    m = re.match(r"--([a-z][a-z0-9-]*)\b", message)
    key = m.group(1).replace("-", "_") if m else None
    if key in getattr(ns, "config_keys", ()):
        return f"--config {ns.config}: '{key}'{message[m.end():]}"
    # a defense names a bad option as `option NAME` or `option 'NAME'`
    m = re.search(r"\boption '?([A-Za-z_][A-Za-z0-9_]*)", message)
    if m and m.group(1) in getattr(ns, "config_options", ()):
        return f"--config {ns.config}: {message}"
    return message


def _say(line: str) -> None:
    """One line to stderr in one write: the processes of an `accelerate launch` share the terminal, and
    print's separate writes of the text and its newline interleave there."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _process_group():
    """torch.distributed where an `accelerate launch` has joined this process to others, else None; read
    without importing torch (`results` and `report` never load it)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _launched() -> tuple[int, int]:
    """(rank, processes) of this process in an `accelerate launch` (torchrun's RANK and WORLD_SIZE), (0, 1)
    without one; read before any process group is up, and without importing torch."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _other_process() -> bool:
    """Whether this is a process of an `accelerate launch` other than the main one."""
    dist = _process_group()
    return dist is not None and dist.get_rank() != 0


def _peer_left(e: BaseException) -> bool:
    """Whether a collective failed because another process of the launch left (its own error, printed by
    it, is the cause): gloo's words for a closed connection."""
    return (isinstance(e, RuntimeError) and _process_group() is not None
            and any(w in str(e) for w in ("Connection closed by peer", "Connection reset by peer")))


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose read end is closed (Linux polls it as POLLERR)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured), or no poll()
        return False


if __name__ == "__main__":
    sys.exit(main())
