"""One benchmark cell: dataset x attack x defense x seed -> stored CACC/ASR with timings."""

from __future__ import annotations

import functools
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import __version__
from .attacks import ATTACKS, get_attack
from .attacks.base import check_target
from .data import BENCHMARKS, check_paraphrases, load_benchmark, split_sizes, target_id
from .defenses import DEFENSES, get_defense
from .errors import UserError
from .evaluate import detection_metrics, evaluate
from .models import check_model
from .options import check_values
from .store import ResultStore, config_hash, data_dir
from .training import (OWN_SETTINGS, has_checkpoint, in_shares, is_main_process, mixed_precision, num_processes,
                       work_lock)

ATTACK_OPTIONS = {"triggers": ("badnets",), "num_triggers": ("badnets",), "sentence": ("addsent",)}


def check_attack_option(opt: str, attacks: list[str]) -> None:
    """An attack-specific option must fit at least one of the attacks it is given with."""
    if not set(ATTACK_OPTIONS[opt]) & set(attacks):
        raise UserError(f"--{opt.replace('_', '-')} applies to --attack {' or '.join(ATTACK_OPTIONS[opt])} only")


def refuse_own_settings(options: dict) -> None:
    """Settings with a flag (and a grid/config key) of their own: as an --option they would have two names."""
    clash = sorted(set(OWN_SETTINGS) & set(options))
    if clash:
        k = clash[0]
        raise UserError(f"option '{k}' has a setting of its own: give --{k.replace('_', '-')} (in a grid or config "
                        f"file, the '{k}' key), not --option {k}=")


@dataclass
class RunConfig:
    """Every setting of a benchmark run. These names are the CLI options (with dashes), the config-file
    keys and the stored config's keys. None means the attack's or defense's own default."""

    dataset: str = "sst2"
    attack: str = "badnets"
    defense: str = "finetune"
    model: str | None = None
    seed: int = 0
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    train_size: int | None = None
    rate: float = 0.1
    mode: str = "dirty"
    target: int | str = 1  # a class id, or a label name of the dataset (stored as its id)
    triggers: list[str] | None = None
    num_triggers: int | None = None
    sentence: str | None = None
    options: dict = field(default_factory=dict)  # defense-specific settings, by the defense's field names

    def __post_init__(self):
        values = check_values(RunConfig, {f.name: getattr(self, f.name) for f in fields(self)}, "run option")
        for k, v in values.items():
            setattr(self, k, v)
        if isinstance(self.target, str) and self.dataset in BENCHMARKS:  # an unknown dataset is check()'s error
            self.target = target_id(self.target, BENCHMARKS[self.dataset][1], self.dataset)

    def check(self) -> None:
        if self.dataset not in BENCHMARKS:
            raise UserError(f"unknown dataset '{self.dataset}' (choose from {', '.join(BENCHMARKS)})")
        if isinstance(self.target, str):  # the dataset was changed after construction
            self.target = target_id(self.target, BENCHMARKS[self.dataset][1], self.dataset)
        if self.attack not in ATTACKS:
            raise UserError(f"unknown attack '{self.attack}' (choose from {', '.join(ATTACKS)})")
        if self.defense not in DEFENSES:
            raise UserError(f"unknown defense '{self.defense}' (choose from {', '.join(DEFENSES)})")
        for opt in ATTACK_OPTIONS:
            if getattr(self, opt) is not None:
                check_attack_option(opt, [self.attack])
        # what would otherwise fail only when the cell runs, after earlier cells of a sweep
        n_classes = BENCHMARKS[self.dataset][0]
        if self.attack in ("syntactic", "style"):
            check_paraphrases(self.dataset, self.attack)
        check_target(self.target, n_classes, self.dataset)
        n_train = split_sizes(self.dataset)["train"]
        if self.train_size is not None and self.train_size <= 0:
            raise UserError(f"--train-size must be positive, got {self.train_size}")
        if self.train_size is not None and self.train_size > n_train:
            raise UserError(f"--train-size {self.train_size} exceeds the {n_train} samples of {self.dataset}'s train split")
        if self.model is not None:
            check_model(self.model)  # a sweep's cells are checked before any runs
        # the attack on this cell's data poisons some sample, fits its pool and leaves a triggered test set:
        # counted by the attack's own apply() logic, drawing nothing (the files are parsed once per process)
        self.build_attack().check(self.benchmark())

    def benchmark(self):
        """The cell's benchmark, its train split subsampled to `train_size` (seeded, label-stratified)."""
        bench = load_benchmark(self.dataset)
        if self.train_size is not None:
            bench.train = bench.train.stratified_sample(self.train_size, self.seed)
        return bench

    def build_attack(self):
        extra = {k: getattr(self, k) for k in ATTACK_OPTIONS if getattr(self, k) is not None}
        return get_attack(self.attack, rate=self.rate, mode=self.mode, target=self.target, seed=self.seed, **extra)

    def build_defense(self):
        refuse_own_settings(self.options)
        own = {k: getattr(self, k) for k in OWN_SETTINGS if getattr(self, k) is not None}
        return get_defense(self.defense, **own, **self.options)

    def run_id(self) -> str:
        """The run's key in the store: the hash of the resolved config (two spellings of one config share it)."""
        return config_hash(self.resolve())

    def resolve(self) -> dict:
        """The full config with every default filled in: what the run's id hashes."""
        self.check()
        attack, defense = self.build_attack(), self.build_defense()
        defense.check_task(BENCHMARKS[self.dataset][0])
        defense.check_backbone(BENCHMARKS[self.dataset][0])
        defense.check_dev(split_sizes(self.dataset)["dev"])
        attack_settings = {f.name: getattr(attack, f.name) for f in fields(attack)}
        defense_settings = {**defense.settings(), **defense.weights()}
        clash = sorted((set(attack_settings) & set(defense_settings)) - {"seed"})
        if clash:  # one name per setting: a shared name would overwrite the other in the stored config
            raise ValueError(f"defense '{self.defense}' and attack '{self.attack}' both define '{clash[0]}'")
        mp, world = mixed_precision(), num_processes()
        resolved = {"dataset": self.dataset, "attack": self.attack, "defense": self.defense,
                    "train_size": self.train_size, **attack_settings, **defense_settings,
                    "clean_data": defense.clean_data,
                    **({} if mp == "no" else {"mixed_precision": mp}),
                    # several processes each take a batch per step: another effective batch, another run
                    **({} if world == 1 else {"processes": world}),
                    "versions": {"cleantune": __version__, "torch": torch.__version__.split("+")[0],
                                 "transformers": _version("transformers"), "peft": _version("peft")}}
        return resolved


@functools.cache  # every cell of a grid asks: metadata lookups walk sys.path
def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def environment() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def peak_memory_mb() -> float:
    """Peak GPU memory of this run, or on CPU the process's peak resident memory (so far, over all runs in
    it: the kernel keeps no per-run peak)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def detection(defense, model, poisoned) -> dict:
    """Detection scores against the attack's ground truth, read only after fit: training samples the
    defense removed (`defense.flagged_`), and test inputs an inference-time detector rejects (`model.flag`)."""
    out = {}
    flagged = getattr(defense, "flagged_", None)
    if flagged is not None:
        out["train_detection"] = detection_metrics(flagged, poisoned.train.poisoned)
    if hasattr(model, "flag"):
        clean, triggered = poisoned.clean_test, poisoned.triggered_test
        # each set in the shares evaluate() took, whose flags the model has cached
        flags = in_shares(model.flag, clean.texts) + in_shares(model.flag, triggered.texts)
        out["test_detection"] = detection_metrics(flags, [False] * len(clean) + [True] * len(triggered))
    return out


def run(config: RunConfig, store: ResultStore | None = None, force: bool = False, resume: bool = False,
        progress: bool = True) -> dict:
    """Run one benchmark cell, or return the stored result of an identical config (unless `force`). A
    second process asking for a cell that one is running waits for it, then takes its stored result."""
    if not isinstance(config, RunConfig):  # a dict of its settings: an AttributeError below
        raise UserError(f"run: config must be a RunConfig, got {type(config).__name__}"
                        + (" (write RunConfig(**settings))" if isinstance(config, dict) else ""))
    if store is not None and not isinstance(store, ResultStore):  # a path: an AttributeError after the checks
        raise UserError(f"run: store must be a ResultStore or None, got {type(store).__name__}"
                        + (" (write ResultStore(path))" if isinstance(store, (str, Path)) else ""))
    resolved = config.resolve()
    run_id = config_hash(resolved)
    stored = _stored(store, run_id, force)
    # The processes of one launch must take the same branch, and another launch may store the cell between
    # their reads here: with several, only the check under the lock (which they reach together, and which
    # no other launch can store this cell during) decides.
    if stored is not None and num_processes() == 1:
        return stored
    work = _work_dir(run_id)
    with work_lock(work, wait=True):
        stored = _stored(store, run_id, force)
        if stored is not None:
            return stored
        return _run(config, resolved, run_id, work, store, resume, progress)


def resumable(config: RunConfig, store: ResultStore | None, force: bool = False) -> bool:
    """Whether `run(config, store, force, resume=True)` would take a stored result or resume a checkpoint,
    rather than train from the start."""
    run_id = config.run_id()
    return _stored(store, run_id, force) is not None or has_checkpoint(_work_dir(run_id))


def _work_dir(run_id: str) -> Path:
    """A run's checkpoints, for --resume until it is stored."""
    return data_dir() / "runs" / run_id[:16]


def _stored(store: ResultStore | None, run_id: str, force: bool) -> dict | None:
    if store is None or force:
        return None
    stored = store.get(run_id)
    return {**stored, "reused": True} if stored is not None and stored["status"] == "ok" else None


def _run(config: RunConfig, resolved: dict, run_id: str, work: Path, store: ResultStore | None, resume: bool,
         progress: bool) -> dict:
    t0 = time.perf_counter()
    if torch.cuda.is_available():  # this run's peak, not the process's (a sweep runs many cells in one)
        torch.cuda.reset_peak_memory_stats()
    poisoned = config.build_attack().apply(config.benchmark())
    defense = config.build_defense()
    if hasattr(defense, "stage_eval"):  # multi-stage defenses (BTU) report CACC/ASR after each stage
        defense.stage_eval = lambda clf: evaluate(clf, poisoned.clean_test, poisoned.triggered_test,
                                                  "stage evaluation" if progress else None, shard=True)
    model = defense.fit(poisoned.train, poisoned.dev, out_dir=work, resume=resume, progress=progress)
    t_eval = time.perf_counter()
    # every process of a launch reaches here and scores its share of the test sets
    metrics = evaluate(model, poisoned.clean_test, poisoned.triggered_test, "evaluate" if progress else None,
                       shard=True)
    report = defense.report_
    metrics.update({"best_epoch": report.best_epoch, "history": report.history,
                    "n_train": len(poisoned.train), "n_poisoned": sum(poisoned.train.poisoned),
                    "n_triggered_test": len(poisoned.triggered_test)})
    metrics.update(getattr(defense, "extra_metrics_", {}))
    metrics.update(detection(defense, model, poisoned))
    if hasattr(defense, "audit"):  # after fit: the attack's trigger words, never seen during fit
        metrics.update(defense.audit(poisoned.trigger_words))
    # a resumed run's wall time adds the training its interrupted sessions did (their setup is not counted)
    timings = {"wall_s": time.perf_counter() - t0 + report.resumed_train_seconds, "train_s": report.train_seconds,
               "eval_s": time.perf_counter() - t_eval, "samples_per_s": report.samples_per_s,
               "tokens_per_s": report.tokens_per_s, "peak_memory_mb": peak_memory_mb(),
               "processes": report.processes,
               # BTU's evaluations after each stage: reporting only, so comparisons of cost leave them out
               **({"stage_eval_s": metrics["btu_seconds"]["stage_eval"]} if "btu_seconds" in metrics else {}),
               **({"resumed_train_s": report.resumed_train_seconds} if report.resumed_train_seconds else {})}
    result = {"id": run_id, "config": resolved, "status": "ok", "metrics": metrics, "timings": timings,
              "env": environment(), "error": None, "reused": False}
    if is_main_process():
        if store is not None:
            store.put(run_id, resolved, metrics, timings, result["env"])
        shutil.rmtree(work, ignore_errors=True)  # checkpoints only serve --resume of an unfinished run
    return result

