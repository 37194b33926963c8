"""The defense interface: configure in __init__ (a dataclass of plain settings), work in `fit`.

A defense receives the (possibly poisoned) training set with poison flags hidden and the clean dev set,
and returns a Classifier. The default `fit` is: seed, build the model, choose what trains
(`prepare_model`), then the one training loop with the defense's step hooks (`hooks`). Multi-stage
defenses override `fit` and call `training.train` for each stage.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

from ..data import TextDataset, text_problem
from ..errors import UserError
from ..options import C_INT_MAX, check_values
from ..store import check_creatable
from ..models import (DEFAULT_MODEL, Classifier, check_max_length, load_model, load_tokenizer,
                      model_skeleton)
from ..training import StepHook, TrainReport, TrainSettings, seed_everything, train


def _parse_interval(interval: str) -> tuple[float, float, bool, bool]:
    low, high = (float(x) for x in interval[1:-1].split(","))
    return low, high, interval[0] == "[", interval[-1] == "]"


def in_interval(value, interval: str) -> bool:
    low, high, low_closed, high_closed = _parse_interval(interval)
    return (low <= value if low_closed else low < value) and (value <= high if high_closed else value < high)


def describe_interval(interval: str, bad: list) -> str:
    """What `interval` asks, in the words a user reads best, given the values outside it: "finite" where those
    are only infinities at an open end, "positive", "at least 0", else the interval itself."""
    low, high, low_closed, _ = _parse_interval(interval)
    if all(math.isinf(v) and v in (low, high) for v in bad):
        return "finite"
    if high == math.inf and low == 0 and not low_closed:
        return "positive"
    if high == math.inf and low_closed:
        return f"at least {low:g}"
    if (low, high) == (-math.inf, math.inf):
        return "a finite number"
    return f"in {interval}"


@dataclass
class Defense:
    model: str = DEFAULT_MODEL
    epochs: int = 3
    batch_size: int = 32
    # 1.5e-4 was chosen for MiniLM on clean dev accuracy (sst2, 2,000 samples, 2 epochs, batch 32): dev 0.841
    # against 0.811 at 5e-5. The papers' 2e-5 is for BERT-base; the small MiniLM needs more. Checked again
    # (benchmarks/muscle_tune.py --defense finetune, seed 0): 0.8601 at 1.5e-4, 0.8635 at 2e-4 (3 of 872
    # samples: noise), 0.8349 at 3e-4, 0.8406 at 5e-4.
    lr: float = 1.5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 128
    seed: int = 0

    name: ClassVar[str] = "defense"
    # What clean labelled data the defense reads, beyond the training set. Every defense selects its
    # epoch on clean dev accuracy; defenses that learn from clean data say how much.
    clean_data: ClassVar[str] = "clean dev: model selection only"
    # Inference-time defenses (filters, detectors) wrap a trained victim; a saved model holds only the victim.
    at_inference: ClassVar[bool] = False
    # Whether `fit(extra_hooks=...)` runs analysis hooks (`cleantune analyze frequency`) through the training
    # of the model it returns. False where that curve would say nothing of the defense: the returned model
    # is plain fine-tuning behind an inference-time filter (STRIP, RAP, ONION) or an edit of one (BTU), or
    # comes out of several trainings with their own step counts (ABL).
    step_hooks: ClassVar[bool] = True
    # Option -> the interval its value (every value, for a list) must lie in, as "(0, inf)" or "[0, 1)"; None
    # passes (a default chosen at fit). With the loop's own settings they are checked when the defense is
    # built, so `run` and `sweep --dry-run` refuse them before any cell trains. NaN lies in no interval, and
    # inf only where the interval closes on it.
    bounds: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fit = cls.__dict__.get("fit")
        if fit is not None and not getattr(fit, "dev_aligned", False):  # a defense's own fit, as Defense's
            cls.fit = _dev_aligned(fit)

    def __post_init__(self):
        self._check_types()
        for name, interval in self.bounds.items():
            value = getattr(self, name)
            if value is None:
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            if not values:  # an empty list is no fallback to the default: that is leaving the option unset
                raise UserError(f"defense '{self.name}': option {name} must list at least one value, got []")
            bad = [v for v in values if not in_interval(v, interval)]
            if bad:
                raise UserError(f"defense '{self.name}': option {name} must be {describe_interval(interval, bad)}, "
                                f"got {value}")
            if any(isinstance(v, int) and v > C_INT_MAX for v in values):
                # torch and PEFT take sizes as C ints: larger ones end in an overflow deep inside them
                raise UserError(f"defense '{self.name}': option {name} must be at most {C_INT_MAX}, got {value}")
        # the loop's settings as far as the defense fixes them (None: chosen at fit, e.g. per backbone)
        TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)
                         if getattr(self, f.name, None) is not None})

    def _check_types(self) -> None:
        """The constructor's values converted to the fields' types as make_defense converts the CLI's and config
        files' (the Python API constructs directly), so that `epochs="2"` works and `epochs=2.5`, `seed=True` or
        `lr=None` fail here in one line, not as a comparison of str and int or deep inside training."""
        values = check_values(type(self), {f.name: os.fspath(v) if isinstance(v, os.PathLike) else v  # model=Path(...)
                                           for f in fields(self) for v in [getattr(self, f.name)]},
                              f"defense '{self.name}'")
        for k, v in values.items():
            setattr(self, k, v)

    def settings(self) -> dict:
        return asdict(self)

    @classmethod
    def option_names(cls) -> set[str]:
        """The options this defense takes (a variant that leaves out a component leaves out its options)."""
        return {f.name for f in fields(cls)}

    def findings(self) -> str:
        """After fit: what the defense found in the training data, in one line (`train` prints it); '' if
        it looks for nothing. The full record is `extra_metrics_`, which `run` stores."""
        return ""

    def weights(self) -> dict:
        """`<setting>_sha256` -> the contents' digest of each local model folder the settings name (model, and a
        victim or language model), so that replacing the files behind a path makes another run and another
        checkpoint, not a reuse of the old weights' result. Empty for short names and hub ids."""
        from ..models import MODEL_SETTINGS, weights_digest

        digests = {f"{k}_sha256": weights_digest(v) for k in MODEL_SETTINGS
                   for v in [getattr(self, k, None)] if isinstance(v, str)}
        return {k: v for k, v in digests.items() if v is not None}

    def identity(self) -> dict:
        """What a checkpoint of this defense must match to be resumed (with the data and stage)."""
        return {"defense": self.name, **self.settings(), **self.weights()}

    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                             max_length=self.max_length, seed=self.seed)

    # --- the parts a defense overrides
    def check_task(self, num_labels: int) -> None:
        """Refuse settings that cannot work for a `num_labels`-class task, before anything trains."""

    def check_dev(self, n_dev: int) -> None:
        """Refuse settings that take more of a clean dev set of `n_dev` samples than it holds, before anything
        trains (a sweep's cell that would fail only in its own fit, after earlier cells trained)."""

    def check_backbone(self, num_labels: int) -> None:
        """Refuse settings that do not fit the backbone (max_length against its position table and its tokenizer's
        special tokens, a module name it lacks, a layer of another kind) before anything loads or trains, on a
        skeleton of the model without weights (`models.model_skeleton`): `prepare_model` runs on it with a copy
        of this defense. Only its own refusals count there: anything else the skeleton cannot do shows, if it is
        real, when the run loads the weights. A `victim` option (an inference-time defense wrapping a trained
        classifier) is loaded once, so a folder that is not a whole classifier of the task's classes is refused
        here too. Then `check_requirements`."""
        _check_backbone(type(self), json.dumps(self.given_settings(), sort_keys=True), num_labels)
        self.check_requirements()

    def check_requirements(self) -> None:
        """Refuse a missing optional package or side model (CUBE's extra, ONION's LM) without importing or
        loading it, or a setting the tokenizer cannot take (RAP's word), so a run stops before its first cell
        trains rather than when this defense's turn comes."""

    def given_settings(self) -> dict:
        """The settings that rebuild this defense as it was given: a setting filled in from others (BTU's
        length from its mode) is left out where that changes what the defense does with it."""
        return self.settings()

    def backbone_max_length(self, model) -> int:
        """The max_length training uses on `model` (BTU caps its mode's length at the backbone's)."""
        return self.max_length

    def prepare_model(self, model, tokenizer, train_data: TextDataset):
        """Return the model to train, with requires_grad set on what should learn."""
        return model

    def hooks(self, model, tokenizer, train_data: TextDataset, clean_dev: TextDataset | None) -> tuple[StepHook, ...]:
        return ()

    def selection_data(self, clean_dev: TextDataset | None) -> TextDataset | None:
        """The clean data that picks the epoch (defenses that learn from dev samples hold those out)."""
        return clean_dev

    # --- the common path
    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True, extra_hooks: tuple[StepHook, ...] = ()) -> Classifier:
        """`extra_hooks` run after the defense's own (analysis hooks, e.g. frequency.FrequencyHook)."""
        self.check_task(train_data.num_labels)
        train_data = train_data.without_flags()
        seed_everything(self.seed)
        tokenizer = load_tokenizer(self.model)
        model = load_model(self.model, train_data.label_names, tokenizer=tokenizer)
        check_max_length(model, tokenizer, self.max_length, f"--model {self.model}")
        model = self.prepare_model(model, tokenizer, train_data)
        hooks = tuple(self.hooks(model, tokenizer, train_data, clean_dev)) + tuple(extra_hooks)
        self.report_: TrainReport = train(model, tokenizer, train_data, self.selection_data(clean_dev),
                                          self.train_settings(), hooks, out_dir, resume, progress, desc=self.name,
                                          identity=self.identity())
        return Classifier(model, tokenizer, train_data.label_names, self.max_length)


@functools.cache  # a sweep checks every cell: each distinct defense setting once
def _check_backbone(cls: type[Defense], settings: str, num_labels: int) -> None:
    defense = cls(**json.loads(settings))
    if getattr(defense, "victim", None) is not None:  # an inference-time defense wrapping a trained classifier
        _check_victim(defense.victim, num_labels)
    skeleton = model_skeleton(defense.model, num_labels)
    check_max_length(skeleton, load_tokenizer(defense.model), defense.backbone_max_length(skeleton),
                     f"--model {defense.model}")
    if cls.prepare_model is Defense.prepare_model:
        return
    try:
        with warnings.catch_warnings():  # PEFT's notes on the layers (GPT-2's Conv1D) come again when the run builds it
            warnings.simplefilter("ignore")
            defense.prepare_model(skeleton, None, None)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a skeleton has no weights: an operation that needs them is not the settings' fault
        pass


@functools.cache
def _check_victim(path: str, num_labels: int) -> None:
    from .common import load_victim

    classes = len(load_victim(path).label_names)
    if classes != num_labels:
        raise UserError(f"option victim: {path} classifies {classes} classes, the data has {num_labels}")


def _dev_aligned(fit):
    """`fit` with `clean_dev` renumbered as `train_data` numbers the same classes (matched by name, as `evaluate`
    matches a test set to a model), or refused where its classes are not the training data's: a dev set built
    elsewhere (a benchmark in its own order, a file of names read in sorted order) would otherwise be read in
    the training data's ids, and the epoch selected on the accuracy of swapped classes. Training data of fewer
    than two classes is refused too: its model would save, but no classifier loads back from it."""

    @functools.wraps(fit)
    def wrapper(self, train_data, clean_dev=None, *args, **kwargs):
        for what, data in (("train_data", train_data), ("clean_dev", clean_dev)):
            if data is None and what == "clean_dev":
                continue
            if not isinstance(data, TextDataset):  # a Benchmark, a list of texts: an AttributeError below
                raise UserError(f"fit: {what} must be a TextDataset (texts with labels), got {type(data).__name__}"
                                + (" (pass its splits: .train, and .dev as clean_dev)"
                                   if hasattr(data, "train") else ""))
            # read_dataset refuses such a text; built by hand, an empty one trained as the special tokens alone
            bad = next(((i, p) for i, t in enumerate(data.texts)
                        if (p := text_problem(t) if isinstance(t, str) else "a text that is no string")), None)
            if bad is not None:
                raise UserError(f"fit: sample {bad[0]} of {what} has {bad[1]}")
        out_dir = kwargs.get("out_dir")
        if out_dir is not None:  # checkpoints go there after the first epoch: refused then, the epoch is lost
            folder = Path(out_dir)
            if folder.exists() and not folder.is_dir():
                raise UserError(f"out_dir {out_dir}: exists and is not a folder")
            check_creatable(folder / "checkpoints", f"out_dir {out_dir}")  # a folder in it: out_dir writable or makeable
        if train_data.num_labels < 2:
            raise UserError(f"the training data names {train_data.num_labels} class(es) "
                            f"({', '.join(train_data.label_names)}); a classifier needs at least two")
        if clean_dev is not None and len(clean_dev) == 0:  # selection and the guards would skip it without a word
            raise UserError("clean_dev holds no sample; give None to train without clean dev data")
        if clean_dev is not None:
            from ..evaluate import align_labels

            clean_dev = align_labels(clean_dev, train_data.label_names, "clean_dev")
        return fit(self, train_data, clean_dev, *args, **kwargs)

    wrapper.dev_aligned = True
    return wrapper


Defense.fit = _dev_aligned(Defense.fit)


def make_defense(cls: type[Defense], options: dict) -> Defense:
    """Build a defense from option names (as in the CLI and config files, where `lora-r` is `lora_r`),
    rejecting unknown ones."""
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    known = cls.option_names()
    # a field outside option_names (a left-out component's) is refused by the constructor, which says why
    unknown = sorted(set(options) - {f.name for f in fields(cls)})
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"defense '{cls.name}' has no option '{unknown[0]}' ({hint}options: {', '.join(sorted(known))})")
    from ..models import MODEL_SETTINGS, SMOLLM2, model_name

    # a relative folder would make run ids, store keys and an adapter's base model depend on the working folder
    # (ONION's lm too: `lm=lm` in two folders named two LMs by one id); ONION's packaged LM stays a name
    options = {k: model_name(v) if k in MODEL_SETTINGS and isinstance(v, str) and v != SMOLLM2 else v
               for k, v in options.items()}
    return cls(**check_values(cls, options, f"defense '{cls.name}'"))
