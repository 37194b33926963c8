"""Frequency analysis of learning dynamics (MuScleLoRA, spec section 6): does the backdoor mapping
converge first because it is lower-frequency?

The "filtering method" of the F-Principle literature, as the official code does it: with inputs x_i
(the embedding layer's output for sample i, flattened) a kernel G_ij = exp(-||x_i - x_j|| / (2 delta)),
row-normalised, splits a function F over the samples (targets Y one-hot, predictions P softmax) into a
low-frequency part G F and a high-frequency part F - G F. Every `every` optimizer steps we record, for
the clean mapping (clean dev, minus GA references) and the backdoor mapping (triggered dev, label =
target) and every delta in linspace(2, 8, 25):

    e_low  = mean_i ||(GP - GY)_i|| / mean_i ||(GY)_i||
    e_high = mean_i ||((P - GP) - (Y - GY))_i|| / mean_i ||(Y - GY)_i||
    LFR    = mean_i ||(GP)_i|| / mean_i ||P_i||,   HFR = mean_i ||(P - GP)_i|| / mean_i ||P_i||

Deliberate deviations from the official code (each fixes a bug of spec section 13.8):
- Inputs are computed in eval mode: the official code leaves embedding dropout on, so the kernel is built
  from randomly masked inputs and changes from one recording to the next. We compute the inputs once,
  at the start of training, so every point of a curve uses the same kernel. (With LoRA the embedding
  layer is frozen and this is exact; under full fine-tuning it is the input space at initialisation.)
- Pad positions are zero vectors (the official code pads with pad-token embeddings per batch, then zeros
  to the longest sequence, so distances depend on how samples were batched).
- The backdoor set has one target for every sample, so Y - GY = 0 and e_high is 0/0 in the official
  code. For a set with one target we divide by mean ||Y|| instead: e_high is then the high-frequency
  content of the prediction error relative to the target's size. The JSON marks those curves with
  "e_high_denominator": "target". A set with several targets keeps the published ratio; where its kernel
  is the identity to working precision (far-apart inputs, a narrow delta), Y - GY vanishes too and e_high
  is NaN there (a gap in the plot), not a number made of rounding.
- Kernels and the filtering are float64 (the official code: float32, where Y - GY loses most of its
  digits once the kernel is close to the identity). The distances are torch.cdist's float32 matrix-product
  form, as published, then float64 with an exact 0 diagonal: computed in float64 they would double the
  memory of the flattened inputs (about 4 GB for 10,000 samples of 128 tokens), for a gain only between
  near-duplicate inputs (float32 cancels a distance of 0.28 between two vectors of norm 855 to 0).
  The kernels of every delta are kept while they fit in KERNEL_BYTES (about 2,300 samples for 25
  deltas); a larger set keeps its distances only and builds
  one kernel at a time at each record (slower, where the official code would need tens of GB).
The distance is the plain (not squared) Euclidean one, as published: a Laplacian kernel. The distances
between flattened embeddings of different sentences are large (hundreds for BERT-sized models), so with
2 delta in [4, 16] the kernel is close to the identity; `distance="median"` divides the distances by their
median first (our option, off by default), which makes the smoothing strong. The median distance is
stored with the curves so a reader can judge the scale.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch

from .data import TextDataset
from .errors import UserError
from .store import strict_json
from .training import StepContext, StepHook, encode, make_batch, predict_logits

DELTAS = [2 + 6 * i / 24 for i in range(25)]  # linspace(2, 8, 25), the published grid
# A set with several targets whose mean ||Y - GY|| is below this share of mean ||Y||: the kernel is the identity
# to float64 precision and e_high is undefined there
UNDEFINED = 1e-9
KERNEL_BYTES = 2**30  # a set's float64 kernels for every delta are kept in memory up to this size


def relative_errors(G, Y: torch.Tensor, P: torch.Tensor) -> dict[str, list[float]]:
    """Spec 6.1 step 5 for kernels G (a K x N x N stack, or any iterable of N x N kernels), targets Y and
    predictions P (N x C)."""
    Y, P = Y.double(), P.double()

    def mean_norm(t):
        return float(t.norm(dim=-1).mean())

    one_target = bool((Y == Y[0]).all())  # the backdoor set: Y - GY = 0 at every delta (the published 0/0)
    out = {"e_low": [], "e_high": [], "lfr": [], "hfr": []}
    p_norm, y_norm = mean_norm(P), mean_norm(Y)
    for g in G:
        g = g.double()
        GY, GP = g @ Y, g @ P
        out["e_low"].append(mean_norm(GP - GY) / mean_norm(GY))
        high_num, high_den = mean_norm((P - GP) - (Y - GY)), mean_norm(Y - GY)
        if one_target:
            out["e_high"].append(high_num / y_norm)
        else:
            out["e_high"].append(high_num / high_den if high_den >= UNDEFINED * y_norm else float("nan"))
        out["lfr"].append(mean_norm(GP) / p_norm)
        out["hfr"].append(mean_norm(P - GP) / p_norm)
    out["e_high_denominator"] = "target" if one_target else "high part of target"
    return out


def distances(X: torch.Tensor, distance: str = "raw") -> tuple[torch.Tensor, float]:
    """Pairwise Euclidean distances (float32's, as published, returned as float64 with the diagonal exactly 0)
    and their median, off the diagonal;
    `distance="median"` divides them by that median."""
    D = torch.cdist(X, X).double()  # matrix-product distances: fast, but the diagonal comes out ~1e-2, not 0
    D.fill_diagonal_(0.0)
    off = D[~torch.eye(len(X), dtype=torch.bool)]
    median = float(off.median()) if len(off) else 0.0
    if distance == "median" and median > 0:
        D = D / median
    return D, median


def kernel(D: torch.Tensor, delta: float) -> torch.Tensor:
    """Row-normalised exp(-D / (2 delta)): the diagonal is exp(0) = 1, so no row sums to 0."""
    G = torch.exp(-D / (2 * delta))
    return G / G.sum(dim=-1, keepdim=True)


def kernels(X: torch.Tensor, deltas: list[float], distance: str = "raw") -> tuple[torch.Tensor, float]:
    """The kernel for each delta as one K x N x N stack, and the median pairwise distance."""
    D, median = distances(X, distance)
    return torch.stack([kernel(D, d) for d in deltas]), median


def embedding_inputs(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """The embedding layer's outputs (eval mode), pad positions zero, flattened to length L_max * d."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(base, base.base_model_prefix, base)
    embed = getattr(encoder, "embeddings", None)
    if embed is None:  # decoder LMs: the raw token embeddings, as the official code
        embed = base.get_input_embeddings()
    ids = encode(tokenizer, texts, max_length)
    width = max(len(x) for x in ids)
    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            batch = make_batch(ids[s: s + batch_size], tokenizer.pad_token_id)
            e = embed(batch["input_ids"].to(device)).float().cpu() * batch["attention_mask"].unsqueeze(-1)
            out.append(torch.nn.functional.pad(e, (0, 0, 0, width - e.shape[1])).flatten(1))
    model.train(was_training)
    return torch.cat(out)


class FrequencyHook(StepHook):
    """Records the curves every `every` optimizer steps, at step 0 and at the end of every epoch into
    `self.records`."""

    def __init__(self, tokenizer, sets: dict[str, TextDataset | Callable[[], TextDataset]], every: int = 5,
                 deltas: list[float] | None = None, distance: str = "raw", samples: int | None = None,
                 seed: int = 0):
        check_settings(every, samples, distance)
        self.tokenizer, self.sets, self.every = tokenizer, sets, every
        self.deltas = list(deltas or DELTAS)
        self.distance, self.samples, self.seed = distance, samples, seed
        self.records: list[dict] = []
        self.meta: dict = {}
        self.epoch_ends: dict[int, int] = {}  # epoch -> the step at its end
        self._resumed: dict[str, torch.Tensor] | None = None  # the distances of a resumed run

    def _settings(self) -> dict:
        return {"every": self.every, "deltas": self.deltas, "distance": self.distance, "samples": self.samples,
                "seed": self.seed}

    def checkpoint_state(self) -> dict:
        # the distances too: they are the inputs of the model the training started from (§6.1, a fixed set), which
        # a resumed run no longer holds (full fine-tuning moves the embeddings)
        return {"settings": self._settings(), "records": self.records, "meta": self.meta,
                "epoch_ends": [[e, s] for e, s in self.epoch_ends.items()],
                **{f"distances.{name}": D for name, D in self.D.items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        """The curves recorded up to the checkpoint; a resumed run records on from there, on the same grid."""
        if state.get("settings") != self._settings():
            theirs = state.get("settings") or {}
            diff = next((k for k, v in self._settings().items() if theirs.get(k) != v), "settings")
            raise UserError(f"--resume: the checkpoint recorded the curves with {diff} {theirs.get(diff)!r}, not "
                            f"{self._settings().get(diff)!r}; resume with the same settings, or start over without --resume")
        self.records, self.meta = state["records"], state["meta"]
        self.epoch_ends = {int(e): int(s) for e, s in state["epoch_ends"]}
        missing = [name for name in self.sets if not isinstance(state.get(f"distances.{name}"), torch.Tensor)]
        if missing:
            raise UserError(f"--resume: the checkpoint holds no input distances for the {missing[0]} set; start over "
                            "without --resume")
        self._resumed = {name: state[f"distances.{name}"] for name in self.sets}

    def on_train_begin(self, ctx: StepContext) -> None:
        self.data, self.D, self.G, self.Y = {}, {}, {}, {}
        if not self._resumed:  # a hook fitted again starts over
            self.records, self.epoch_ends = [], {}
        for name, ds in self.sets.items():
            ds = ds() if callable(ds) else ds
            if self.samples is not None and len(ds) > self.samples:
                ds = ds.subset(sorted(random.Random(f"freq-{self.seed}-{name}").sample(range(len(ds)), self.samples)))
            if self._resumed:
                self.D[name], median = self._resumed[name], self.meta[name]["median_distance"]
            else:
                X = embedding_inputs(ctx.model, self.tokenizer, ds.texts, ctx.settings.max_length)
                self.D[name], median = distances(X, self.distance)
            fits = len(self.deltas) * self.D[name].numel() * 8 <= KERNEL_BYTES
            self.G[name] = torch.stack([kernel(self.D[name], d) for d in self.deltas]) if fits else None
            self.Y[name] = torch.eye(ds.num_labels)[torch.tensor(ds.labels)]
            self.data[name] = ds
            self.meta[name] = {"n": len(ds), "median_distance": median}
        if not self._resumed:  # resumed: the checkpoint's epoch end, recorded already
            self.record(ctx)
        self._resumed = None

    def after_backward(self, ctx: StepContext) -> None:
        # the model after ctx.step updates, unless the last epoch's end recorded it
        if ctx.step > 0 and ctx.step % self.every == 0 and self.records[-1]["step"] != ctx.step:
            self.record(ctx)

    def on_epoch_end(self, ctx: StepContext) -> None:
        # every epoch's model: after_backward sees each step before its update, so never an epoch's last one;
        # clean-dev selection returns one of these
        self.epoch_ends[ctx.epoch] = ctx.step
        if self.records[-1]["step"] != ctx.step:
            self.record(ctx)

    def record(self, ctx: StepContext) -> None:
        rec = {"step": ctx.step, "epoch": ctx.epoch}
        for name, ds in self.data.items():
            P = predict_logits(ctx.model, self.tokenizer, ds.texts, ctx.settings).softmax(-1)
            G = self.G[name] if self.G[name] is not None else (kernel(self.D[name], d) for d in self.deltas)
            rec[name] = relative_errors(G, self.Y[name], P)
        self.records.append(rec)

    def result(self, best_epoch: int | None = None) -> dict:
        """The curves. `best_epoch`: the epoch clean-dev selection returned (TrainReport.best_epoch; None: no
        selection, so the last finished epoch), whose end is `returned_step`, the model scored and saved."""
        ends = self.epoch_ends
        returned = ends.get(best_epoch if best_epoch is not None else max(ends, default=None))
        return {"deltas": self.deltas, "distance": self.distance, "every": self.every, "sets": self.meta,
                "records": self.records, "best_epoch": best_epoch, "returned_step": returned}


def first_step_below(result: dict, name: str, key: str = "e_low", delta_index: int = 0,
                     threshold: float = 0.5) -> int | None:
    """The first recorded step at which a curve falls below `threshold` (None: never)."""
    for rec in result["records"]:
        if rec[name][key][delta_index] < threshold:
            return rec["step"]
    return None


def plot(result: dict, delta_indices: tuple[int, ...] = (0, 12, 24)) -> dict[str, bytes]:
    """One PNG per chosen delta, by file name: e_low and e_high against steps, clean vs backdoor mapping."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in result["records"]]
    images = {}
    for k in delta_indices:
        if k >= len(result["deltas"]):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, title in ((axes[0], "e_low", "low frequency"), (axes[1], "e_high", "high frequency")):
            for name, style in (("clean", "-"), ("poison", "--")):
                if name in result["sets"]:
                    label = {"clean": "clean mapping (clean dev)", "poison": "backdoor mapping (triggered dev)"}[name]
                    if key == "e_high" and result["records"][0][name].get("e_high_denominator") == "target":
                        label += ", / mean ||Y||"  # one target: the published denominator is 0
                    ax.plot(steps, [r[name][key][k] for r in result["records"]], style, label=label)
            returned = result.get("returned_step")
            if returned is not None and returned != steps[-1]:
                ax.axvline(returned, color="grey", linestyle=":", label=f"returned model (epoch {result['best_epoch']})")
            ax.set_title(f"relative error, {title}")
            ax.set_xlabel("optimizer step")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        fig.suptitle(f"delta = {result['deltas'][k]:.2f} ({result['distance']} distances)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        images[f"frequency_delta{result['deltas'][k]:.2f}.png"] = buf.getvalue()
    return images


def supported_defenses() -> list[str]:
    """The defenses whose returned model is trained by one run of the training loop that takes the hook
    (Defense.step_hooks); for BKI and CUBE that is the final training on the data they kept."""
    from .defenses import DEFENSES

    return [name for name, cls in DEFENSES.items() if cls.step_hooks]


def check_defense(name: str) -> None:
    from .defenses import DEFENSES

    if name in DEFENSES and not DEFENSES[name].step_hooks:
        raise UserError(f"--defense {name}: analyze frequency supports {', '.join(supported_defenses())} "
                        "(the others' defended model is not one training run; for an inference-time filter's or "
                        "btu's victim use finetune)")


def check_settings(every: int, samples: int | None, distance: str) -> None:
    if every < 1:
        raise UserError(f"--every must be at least 1, got {every}")
    if samples is not None and samples < 2:
        raise UserError(f"--samples must be at least 2 (distances need pairs), got {samples}")
    if distance not in ("raw", "median"):
        raise UserError(f"--distance must be raw or median, got '{distance}'")


def analyze(config, out_dir: str | Path, every: int = 5, samples: int | None = None, distance: str = "raw",
            progress: bool = True, work_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train one benchmark cell (a runner.RunConfig) with the frequency hook; write curves.json and PNGs.
    `work_dir`: where each epoch's checkpoint goes (the recorded curves with it), so that `resume` continues
    an interrupted analysis; None: no checkpoints."""
    from .evaluate import evaluate
    from .models import load_tokenizer

    check_defense(config.defense)  # before any data loads or model trains
    check_settings(every, samples, distance)
    config.check()
    from .models import check_out_dir

    check_out_dir(out_dir, "curves.json", "frequency analysis", siblings=(), option="out_dir")  # before training
    out_dir = Path(out_dir)
    poisoned = config.build_attack().apply(config.benchmark())
    defense = config.build_defense()
    hook = FrequencyHook(load_tokenizer(defense.model),
                         {"clean": lambda: defense.selection_data(poisoned.dev), "poison": poisoned.triggered_dev},
                         every=every, distance=distance, samples=samples, seed=config.seed)
    model = defense.fit(poisoned.train, poisoned.dev, out_dir=work_dir, resume=resume, progress=progress,
                        extra_hooks=(hook,))
    result = hook.result(defense.report_.best_epoch)
    result["config"] = config.resolve()  # as `run` stores it: every default filled in
    result["metrics"] = evaluate(model, poisoned.clean_test, poisoned.triggered_test, shard=True)
    resolved = getattr(defense, "extra_metrics_", {}).get("resolved_settings")
    if resolved:  # settings the defense resolves only on the model (MuScleLoRA's per-backbone lr)
        result["metrics"]["resolved_settings"] = resolved
    result["first_step_e_low_below_0.5"] = {n: first_step_below(result, n) for n in result["sets"]}
    from .training import is_main_process

    if not is_main_process():  # an `accelerate launch`'s processes hold the same curves: two writers of one file race
        result["plots"] = []
        return result
    result["plots"] = [str(p) for p in write_outputs(result, out_dir)]
    return result


def write_outputs(result: dict, out_dir: Path) -> list[Path]:
    """curves.json and the plots, all or none of them (store.write_whole): a full disk or a kill mid-write left
    a curves.json without its plots, or a cut file, in place of an earlier analysis. Returns the plots' paths."""
    from .store import write_whole

    images = plot(result)
    files = {out_dir / "curves.json": strict_json(result, indent=1).encode()}  # e_high where undefined: null
    files.update({out_dir / name: data for name, data in images.items()})
    write_whole(out_dir, files, "curves")
    return [out_dir / name for name in images]
