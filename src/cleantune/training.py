"""The one training loop. Read it top to bottom: `train` is the whole of it.

Accelerate runs it unchanged on one CPU, one GPU or many processes (`accelerate launch`). Batches are
built from pre-tokenised ids, grouped by length and padded only to the longest sample of the batch.
Defenses change what trains (requires_grad) before calling `train`, and change the step through
hooks (MuScleLoRA's gradient alignment rewrites the gradients after the backward pass).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data import TextDataset
from .errors import UserError
from .store import file_sha256, missing_parents, remove_empty

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
LR_MAX = 1e37


# Settings with a command-line flag (and a RunConfig field) of their own: never a defense option
OWN_SETTINGS = ("seed", "model", "epochs", "lr", "batch_size", "max_length")


@dataclass
class TrainSettings:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    eval_batch_size: int = 128
    group_by_length: bool = True
    pad_to_length: int | None = None  # pad every batch to this fixed width (static shapes; the throughput baseline)
    seed: int = 0
    # "linear": warmup, then linear decay to 0; "constant": warmup, then flat (BTU's official code, whose
    # warmup is 0: a warmup_ratio given with it is kept, not dropped without a word)
    lr_schedule: str = "linear"

    def __post_init__(self):
        def given(name: str) -> str:  # as the user gives it: a command-line flag, else a defense option
            return f"--{name.replace('_', '-')}" if name in OWN_SETTINGS else f"option {name}"

        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{given(name)} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        # AdamW's first step divides lr by 1 - beta1 = 0.1 and hands it to a float32 kernel, which raises
        # (a traceback, mid-run) above 3.4e38: 1e37 leaves that margin. Anything near it diverges at once anyway.
        if not self.lr <= LR_MAX:
            raise UserError(f"--lr must be a finite number of at most {LR_MAX:g}, got {self.lr}")
        # AdamW refuses a negative decay with a ValueError; past float32's range it is inf in the weights
        if not 0 <= self.weight_decay <= FLOAT32_MAX:
            raise UserError(f"{given('weight_decay')} must be a finite number >= 0, got {self.weight_decay}")
        if math.isnan(self.max_grad_norm):  # inf and <= 0 are meaningful: no clipping
            raise UserError(f"{given('max_grad_norm')} must be a number, got {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"{given('warmup_ratio')} must be in [0, 1), got {self.warmup_ratio}")
        check_seed(self.seed)
        if self.lr_schedule not in ("linear", "constant"):
            raise UserError(f"{given('lr_schedule')} must be linear or constant, got '{self.lr_schedule}'")


@dataclass
class StepContext:
    """What a hook sees: the (unwrapped) model and where the loop stands."""

    model: torch.nn.Module
    accelerator: object
    epoch: int
    step: int            # optimizer steps so far, over all epochs
    steps_per_epoch: int
    settings: TrainSettings
    logs: dict = field(default_factory=dict)
    loss: torch.Tensor | None = None  # the step's mean loss over all processes (detached), for after_backward
    optimizer: object = None  # the (prepared) AdamW, for defenses that carry its state across stages (BTU)


class StepHook:
    """Override what a defense needs; every method is optional."""

    def on_train_begin(self, ctx: StepContext) -> None: ...

    def after_backward(self, ctx: StepContext) -> None:
        """Called after loss.backward() and before clipping; may rewrite each parameter's .grad."""

    def on_epoch_end(self, ctx: StepContext) -> None: ...

    def checkpoint_state(self) -> dict | None:
        """What the hook has gathered that --resume must carry on, saved with each epoch's checkpoint: JSON
        values, and tensors (saved as safetensors) as top-level values; None: nothing (a hook that recomputes
        all it needs)."""
        return None

    def load_checkpoint_state(self, state: dict) -> None:
        """Take back `checkpoint_state()` from the checkpoint a run resumes from; called before on_train_begin."""


@dataclass
class TrainReport:
    history: list[dict]
    best_epoch: int | None
    train_seconds: float
    samples_per_s: float
    tokens_per_s: float  # non-padding tokens
    processes: int = 1
    resumed_train_seconds: float = 0.0  # of train_seconds, what sessions before a --resume spent


def mixed_precision() -> str:
    """ACCELERATE_MIXED_PRECISION, which `accelerate launch --mixed_precision bf16|fp16` sets: the training
    loop uses it and a run's resolved config records it (a mixed-precision run is another run, with its own
    id; absent under full precision, so the ids of fp32 runs stay what they were)."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mp not in ("no", "fp16", "bf16"):
        raise UserError(f"ACCELERATE_MIXED_PRECISION={mp}: expected no, fp16 or bf16")
    if mp == "fp16" and not torch.cuda.is_available():  # Accelerate would train in fp32 without a word
        raise UserError("ACCELERATE_MIXED_PRECISION=fp16 needs a GPU; on a CPU use bf16")
    return mp


def process_state():
    """This process's place in an `accelerate launch` (Accelerate's shared PartialState; one process without
    a launch). cpu=True on a machine without CUDA makes a multi-process launch join over gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """False in the non-zero ranks of `accelerate launch`: only the main process writes files."""
    return process_state().is_main_process


def flush_subnormals() -> None:
    """Float32 values below 1.2e-38 become 0 on the CPU (FTZ/DAZ). Late in gradient alignment the reference
    gradients, and with them the optimizer's moments, drift into that range, where x86 arithmetic is many
    times slower: a `ga` step at the paper's budget took 9.0 s instead of 1.42 s. A GPU keeps subnormals,
    so this is a deliberate CPU deviation; it changes only values that small. The flag is per thread and
    the intra-op threads copy it when they start, so a process must set it before its first parallel op:
    the CLI and sweep workers do so first thing (docs/muscle-lora.md, "Subnormals on the CPU")."""
    torch.set_flush_denormal(True)


def num_processes() -> int:
    """How many processes of one `accelerate launch` train a run together (1 without a launch). Each takes a
    batch per step, so the effective batch, and with it the results, depend on it."""
    return process_state().num_processes


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Optimizer steps an epoch of n samples takes: a step takes a batch in each of the `world` processes."""
    return math.ceil(math.ceil(n / batch_size) / world)


def in_shares(fn, items: list) -> list:
    """`fn(items)`, with the items split among the processes of an `accelerate launch`: each process passes
    the same items, applies `fn` to its contiguous share, and gets the whole result back in the items'
    order. Every process must call it (one alone would wait for the others); with one process it is
    `fn(items)`. So a launch's N processes score a test set in about 1/N of the time one process takes."""
    state = process_state()
    if state.num_processes == 1:
        return list(fn(items))
    share = math.ceil(len(items) / state.num_processes)
    mine = items[state.process_index * share: (state.process_index + 1) * share]
    parts = [None] * state.num_processes
    torch.distributed.all_gather_object(parts, list(fn(mine)) if len(mine) else [])
    return [x for part in parts for x in part]


def check_seed(seed: int) -> None:
    if not -2**63 <= seed < 2**64:  # what torch.manual_seed takes
        raise UserError(f"--seed must fit in 64 bits, got {seed}")


def seed_everything(seed: int) -> None:
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        # Same seed, same metrics on a GPU too: deterministic kernels (atomics-based ones such as the
        # embedding backward otherwise reorder float sums run to run). warn_only: an op without a
        # deterministic kernel warns instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deliberately no CUBLAS_WORKSPACE_CONFIG=:4096:8, which PyTorch asks for here: cuBLAS gives the same
        # bits run to run on one stream (NVIDIA's reproducibility note; the setting matters for several
        # concurrent streams, and training uses one), while PyTorch 2.11 parses the variable with a std::regex
        # at every cuBLAS call: 66 vs 24 us of host time per product, 171 vs 24 per linear with bias, on an
        # H100 (benchmarks/cublas_overhead.py), which made a MiniLM step host-bound. A user who sets it keeps
        # it; without it PyTorch's warning at every product says only that, so it is silenced.
        warnings.filterwarnings("ignore", message=r"(?s)Deterministic behavior was enabled.*CuBLAS")
        # warn_only leaves the fused attention kernels' backward nondeterministic (they only warn): attention
        # runs as plain matmuls and softmax instead, cheap at classification lengths (<= 128 tokens by default)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def make_batch(ids: list[list[int]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    width = max(width or 0, max(len(x) for x in ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Shuffled batches of indices. With grouping, samples are sorted by length inside mega-batches of
    50 batches (as transformers' LengthGroupedSampler), so a batch pads little but order stays random."""
    rng = random.Random(f"batches-{seed}-{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        mega = batch_size * 50
        idx = [i for s in range(0, len(idx), mega) for i in sorted(idx[s: s + mega], key=lambda i: -lengths[i])]
    batches = [idx[s: s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def process_batches(batches: list[list[int]], world: int, rank: int) -> list[list[int]]:
    """Process `rank`'s share of an epoch's batches. Every process must take steps_per_epoch steps (each is a
    collective), so the list is topped up from its start, going round it again when there are fewer batches
    than the top-up needs (a stage smaller than a batch per process, such as ABL's isolated samples, on three
    or more processes): a process left with fewer steps waits in the next collective for ever."""
    return (batches + list(itertools.islice(itertools.cycle(batches), (-len(batches)) % world)))[rank::world]


def _fingerprint(settings: TrainSettings, ids: list[list[int]], labels: list[int], dev_data: TextDataset | None,
                 identity: dict | None, desc: str) -> str:
    """What a checkpoint must match to be resumed: the settings, the precision, the process count (the
    effective batch), the stage (`desc`), the
    caller's identity (a defense's settings, model included) and the content of the training and selection
    data, so `train --resume` into the same folder with another file or defense is refused, not blended."""
    h = hashlib.sha256(json.dumps({"settings": asdict(settings), "precision": mixed_precision(), "desc": desc,
                                   "identity": identity, "processes": num_processes()},
                                  sort_keys=True, default=str).encode())
    h.update(np.array([len(x) for x in ids], dtype=np.int64).tobytes())
    h.update(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64).tobytes())
    h.update(np.array(labels, dtype=np.int64).tobytes())
    if dev_data is not None:
        h.update("\0".join(dev_data.texts).encode())
        h.update(np.array(dev_data.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in _trainable(model).items():
        (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def predict_logits(model, tokenizer, texts: list[str], settings: TrainSettings) -> torch.Tensor:
    """Logits for texts; the processes of a launch each score a share (`in_shares`), so every process must call
    it. As lists, not tensors: a pickled row of a tensor carries the whole tensor's storage (float32 -> Python
    float -> float32 is exact)."""
    from .models import Classifier

    clf = Classifier(model, tokenizer, [str(i) for i in range(model.config.num_labels)], settings.max_length)
    rows = in_shares(lambda share: clf.predict_logits(share, settings.eval_batch_size).tolist(), list(texts))
    return torch.tensor(rows) if rows else torch.empty(0, model.config.num_labels)


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean()) if labels else float("nan")


def train(model, tokenizer, train_data: TextDataset, dev_data: TextDataset | None = None,
          settings: TrainSettings | None = None, hooks: tuple[StepHook, ...] = (), out_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True, desc: str = "train", identity: dict | None = None) -> TrainReport:
    """Train the parameters of `model` that require grad on `train_data` (AdamW, linear warmup and decay,
    clipping). After each epoch the model is scored on the clean `dev_data`; the best epoch (ties keep the
    earlier) is restored at the end. A non-finite gradient stops training and keeps that epoch, or without
    dev data the last finished one; with none to keep it raises Diverged. With `out_dir`, a checkpoint is
    written per epoch and `resume` continues from the last one; `identity` (e.g. the defense's settings) is
    part of what it must match.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    settings = settings or TrainSettings()
    if len(train_data) == 0:
        raise UserError("the training set is empty")
    # cpu=True on a machine without CUDA makes a multi-process launch use DDP over gloo (MULTI_CPU).
    mp = mixed_precision()
    try:
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp)
    except ValueError as e:  # e.g. this process's AcceleratorState was made with another precision
        raise UserError(f"mixed precision {mp}: {e}") from None
    ids = encode(tokenizer, train_data.texts, settings.max_length)
    lengths = [len(x) for x in ids]
    labels = train_data.labels
    world, rank = accelerator.num_processes, accelerator.process_index
    epoch_steps = steps_per_epoch(len(ids), settings.batch_size, world)
    total_steps = epoch_steps * settings.epochs

    params = _trainable(model)
    if not params:
        raise UserError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr)
    # the ratio as written, not its binary float: int(0.58 * 50) is 28, not 29 warmup steps
    warmup = math.floor(Fraction(repr(float(settings.warmup_ratio))) * total_steps)
    if settings.lr_schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    ckpt_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None
    # only a checkpoint needs it: hashing the data is skipped for runs that write none (BTU's exposure passes)
    fingerprint = _fingerprint(settings, ids, labels, dev_data, identity, desc) if ckpt_dir is not None else None
    history: list[dict] = []
    best_epoch, best_score, best_state = None, -1.0, None
    selecting = dev_data is not None and len(dev_data) > 0
    # without dev data the last finished epoch is what a divergence falls back to: its weights are kept
    # aside (the live ones are mid-epoch by then)
    last_epoch, last_state = None, None
    start_epoch, done = 0, {}
    saved = _saved_checkpoint(ckpt_dir) if resume and ckpt_dir is not None else None
    if saved is not None:
        state, weights, opt_state, rng, best = _read_checkpoint(saved, fingerprint, settings.epochs)
        for n, p in params.items():
            p.data.copy_(weights[n])
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        if accelerator.scaler is not None and "scaler" in opt_state:  # fp16: the loss scale goes on
            accelerator.scaler.load_state_dict(opt_state["scaler"])
        mine = "" if rank == 0 else f"_{rank}"  # this process's own state (_rng_states)
        torch.set_rng_state(rng[f"torch{mine}"])
        if f"cuda{mine}" in rng and accelerator.device.type == "cuda":  # dropout on a GPU draws from the GPU's generator
            torch.cuda.set_rng_state(rng[f"cuda{mine}"], accelerator.device)
        history, best_epoch, best_score, best_state = state["history"], state["best_epoch"], state["best_score"], best
        start_epoch = state["epoch"] + 1
        if not selecting:  # the checkpoint's weights are the last finished epoch's
            last_epoch, last_state = state["epoch"], {n: weights[n].clone() for n in params}
        done = state.get("done", {})  # the interrupted sessions' work, so the report covers the whole run
        kept = state.get("hooks", {})
        for key, h in _hook_keys(hooks).items():
            if key in kept:
                h.load_checkpoint_state(kept[key])
            elif h.checkpoint_state() is not None:  # the hook would start over mid-run
                raise UserError(f"--resume: the checkpoint in {saved} holds no state for {key}; start over "
                                "without --resume")

    ctx = StepContext(model, accelerator, start_epoch, start_epoch * epoch_steps, epoch_steps, settings,
                      optimizer=optimizer)
    for h in hooks:
        h.on_train_begin(ctx)
    bar = tqdm(total=total_steps, initial=start_epoch * epoch_steps, desc=desc, unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True, leave=False)
    n_samples, n_tokens = done.get("samples", 0), done.get("tokens", 0)
    t_train = t_before = done.get("train_seconds", 0.0)
    diverged = None
    clipped = list(params.values())
    clip = settings.max_grad_norm if settings.max_grad_norm > 0 else math.inf  # inf (no clipping) scales by 1
    for epoch in range(start_epoch, settings.epochs):
        ctx.epoch = epoch
        wrapped.train()
        batches = batch_order(lengths, settings.batch_size, settings.seed, epoch, settings.group_by_length)
        mine = process_batches(batches, world, rank)
        loss_sum, t0 = 0.0, time.perf_counter()
        for b in mine:
            batch = make_batch([ids[i] for i in b], tokenizer.pad_token_id, settings.pad_to_length)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            y = torch.tensor([labels[i] for i in b], device=accelerator.device)
            loss = torch.nn.functional.cross_entropy(wrapped(**batch).logits.float(), y)
            accelerator.backward(loss)
            # the mean over processes, as the gradient is: a hook deciding on it decides alike in every process
            ctx.loss = accelerator.reduce(loss.detach(), "mean") if world > 1 else loss.detach()
            for h in hooks:
                h.after_backward(ctx)
            # the norm is taken after the all-reduce, so every process sees the same value and stops together.
            # Under fp16 an inf norm is the loss scaler's overflow, which it handles by skipping the step: not a
            # divergence.
            grad_norm = accelerator.clip_grad_norm_(clipped, clip)
            if grad_norm is not None and accelerator.scaler is None and not math.isfinite(float(grad_norm)):
                diverged = ctx.step  # skipped: the weights stay those of the last finite step
                optimizer.zero_grad(set_to_none=True)
                break
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ctx.step += 1
            # one device sync per step, shared by the sum and the progress bar; over all processes' batches
            loss_value = ctx.loss.item()
            loss_sum += loss_value
            n_samples += len(b) * world
            n_tokens += int(batch["attention_mask"].sum()) * world
            bar.update(1)
            elapsed = t_train + time.perf_counter() - t0
            bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", **{"samples/s": f"{n_samples / max(elapsed, 1e-9):.0f}"})
        t_train += time.perf_counter() - t0
        if diverged is not None:
            # stop without a checkpoint for this epoch and fall back to the best epoch so far
            history.append({"epoch": epoch, "diverged_at_step": diverged, **ctx.logs})
            break
        record = {"epoch": epoch, "steps": len(mine), "loss": loss_sum / max(1, len(mine))}
        if selecting:
            dev_logits = predict_logits(accelerator.unwrap_model(wrapped), tokenizer, dev_data.texts, settings)
            record["dev_acc"] = accuracy(dev_logits, dev_data.labels)
            if record["dev_acc"] > best_score:
                best_epoch, best_score = epoch, record["dev_acc"]
                best_state = {n: p.detach().cpu().clone() for n, p in params.items()}
        record.update(ctx.logs)
        history.append(record)
        for h in hooks:
            h.on_epoch_end(ctx)
        if not selecting and epoch < settings.epochs - 1:  # after the last epoch nothing can diverge
            last_epoch, last_state = epoch, {n: p.detach().cpu().clone() for n, p in params.items()}
        rng = _rng_states(accelerator) if ckpt_dir is not None else None
        failed = None
        if ckpt_dir is not None and accelerator.is_main_process:
            try:
                with disk_errors():
                    _save_checkpoint(ckpt_dir, params, optimizer, scheduler, best_state, rng,
                                     {"epoch": epoch, "history": history, "best_epoch": best_epoch,
                                      "best_score": best_score, "fingerprint": fingerprint,
                                      "done": {"samples": n_samples, "tokens": n_tokens, "train_seconds": t_train}},
                                     {k: h.checkpoint_state() for k, h in _hook_keys(hooks).items()},
                                     accelerator.scaler)
            except OSError as e:  # a full disk, a failed write-back: the earlier checkpoint is still whole
                failed = (f"cannot write epoch {epoch}'s checkpoint in {ckpt_dir.parent} ({e.strerror or e}); " +
                          ("the previous one is kept: free space, then the same command with --resume"
                           if _saved_checkpoint(ckpt_dir) is not None else "free space, then run the command again"))
        if ckpt_dir is not None and world > 1:
            # every process learns the main one's outcome and stops with its message: raised on the main one
            # alone, the others would fail in their next collective with a gloo traceback
            from accelerate.utils import broadcast_object_list

            failed = broadcast_object_list([failed])[0]
        if failed is not None:
            raise UserError(failed)
        accelerator.wait_for_everyone()
    bar.close()
    if diverged is not None:
        kept, kept_epoch, which = ((best_state, best_epoch, "the best on clean dev") if selecting else
                                   (last_state, last_epoch, "the last finished one (no dev data to select on)"))
        # a finite gradient can still have stepped the weights to inf (a huge lr): nothing worth keeping then
        if kept is None or not all(bool(torch.isfinite(t).all()) for t in kept.values()):
            raise Diverged(f"training diverged at step {diverged} (epoch {epoch}): the gradient is not finite; "
                           f"lower the learning rate (lr={settings.lr:g})")
        warnings.warn(f"training diverged at step {diverged} (epoch {epoch}): the gradient is not finite; stopped "
                      f"and kept epoch {kept_epoch}, {which}", RuntimeWarning, stacklevel=2)
        best_state = kept
    if best_state is not None:
        for n, p in params.items():
            p.data.copy_(best_state[n])
    accelerator.unwrap_model(wrapped).eval()
    return TrainReport(history, best_epoch, t_train, n_samples / max(t_train, 1e-9), n_tokens / max(t_train, 1e-9),
                       world, resumed_train_seconds=t_before)


class Busy(UserError):
    """Another live process holds the lock."""


class Diverged(UserError):
    """The gradient stopped being finite before any epoch worth keeping: resuming would diverge again."""


@contextmanager
def work_lock(work: Path, wait: bool):
    """Hold `<work>.lock` while training into the checkpoint folder `work`: two processes on one folder would
    overwrite each other's checkpoints, or resume from one still being written. `wait`: block until the
    other process is done; else raise Busy. The lock is the kernel's (flock), so a killed holder frees it.
    A run that raises Diverged leaves no checkpoints: the same seed and data diverge again on --resume
    (other failures, an interruption or a refused --resume, keep them)."""
    path = work.with_name(work.name + ".lock")
    # what _flock and the checkpoints create: removed again, where still empty, if training fails
    made = ([] if work.exists() else [work]) + missing_parents(path)
    state = process_state()
    if state.num_processes == 1:
        fd = _flock(path, wait)
        got = fd is not None
    else:
        # the processes of one launch train together, so the main one locks for all. It tries without blocking
        # and tells the others each second: a collective that waited as long as the other launch trains would
        # pass the process group's timeout (30 minutes).
        from accelerate.utils import broadcast_object_list

        while True:
            fd = _flock(path, wait=False) if state.is_main_process else None
            got = broadcast_object_list([fd is not None])[0]
            if got or not wait:
                break
            time.sleep(1.0)
    if not got:
        raise Busy(f"another cleantune process is training into {work}")
    failed = True
    try:
        yield
        failed = False
    except Diverged:
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)
            if failed:  # checkpoints kept for --resume keep their folders
                remove_empty(made)


def _flock(path: Path, wait: bool) -> int | None:
    """The open, locked lock file; None when another process holds it and `wait` is false."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # before any training: a folder (a run's under $XDG_DATA_HOME) that cannot be written
        raise UserError(f"cannot write {path.parent} ({e.strerror}): training keeps its checkpoints and lock "
                        "there") from None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:  # only without `wait`
            os.close(fd)
            return None
        try:  # the holder before us may have removed the file: then lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def has_checkpoint(work: Path) -> bool:
    """Whether a run's work folder holds a checkpoint to resume (any stage's, finished or mid-rename)."""
    return work.is_dir() and any(work.rglob("state.json"))


def _saved_checkpoint(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint to resume from: `ckpt_dir`, or, after a kill between _save_checkpoint's two
    renames (the old one moved aside, the new one not yet in place), the finished new one (its state.json is
    written last) or else the old one. The next save replaces whichever was read."""
    for folder in (ckpt_dir, ckpt_dir.with_name(ckpt_dir.name + ".partial"), ckpt_dir.with_name(ckpt_dir.name + ".old")):
        if (folder / "state.json").is_file():
            return folder
    return None


CHECKPOINT_FILES = ("trainable.safetensors", "best.safetensors", "optimizer.pt", "rng.safetensors", "hooks.safetensors")


def _read_checkpoint(saved: Path, fingerprint: str, epochs: int):
    """The checkpoint in `saved`, read whole before any of it is applied: its state, trainable weights, optimizer
    and scheduler state, random states and the best epoch's weights (None without). One that cannot be read (a
    disk that filled up mid-save, a file deleted or edited) is a UserError, not a traceback from json,
    safetensors or torch."""
    import pickle

    from safetensors import SafetensorError

    name = "state.json"
    try:
        state = json.loads((saved / name).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        if state["fingerprint"] != fingerprint:
            raise UserError(f"--resume: the checkpoint in {saved} was made with other settings, data or model weights")
        # what _save_checkpoint writes: anything else fails mid-run, or (an epoch out of range) trains other epochs
        epoch, history, done = state["epoch"], state["history"], state.get("done", {})
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < epochs:
            raise ValueError(f"epoch {json.dumps(epoch)} is not one of 0..{epochs - 1}")
        if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)
                and (state["best_epoch"] is None or type(state["best_epoch"]) is int)
                and type(state["best_score"]) in (int, float)
                and isinstance(done, dict) and all(type(v) in (int, float) for v in done.values())):
            raise ValueError("history, best_epoch, best_score or done is not what cleantune writes")
        sums = state.get("sha256", {})  # checkpoints written before the checksums carry none
        if not (isinstance(sums, dict) and set(sums) <= set(CHECKPOINT_FILES)
                and all(isinstance(v, str) for v in sums.values())):
            raise ValueError("sha256 is not what cleantune writes")
        for name, digest in sorted(sums.items()):  # a changed byte mid-file reads as valid weights or Adam moments
            if file_sha256(saved / name) != digest:
                raise ValueError("its contents changed after it was saved (sha256 differs)")
        name = "trainable.safetensors"
        weights = load_file(saved / name)
        name = "optimizer.pt"
        opt_state = torch.load(saved / name, weights_only=True)
        name = "rng.safetensors"
        rng = load_file(saved / name)
        name = "best.safetensors"  # saved with every best epoch: without it the run would keep the last one
        best = load_file(saved / name) if state["best_epoch"] is not None else None
        name = "state.json"
        hooks = state.get("hooks", {})  # checkpoints written before hooks kept state hold none
        if not (isinstance(hooks, dict) and all(isinstance(h, dict) for h in hooks.values())):
            raise ValueError("hooks is not what cleantune writes")
        name = "hooks.safetensors"  # the hooks' tensors, "<hook>/<key>"
        if "hooks.safetensors" in sums:
            for key, t in load_file(saved / name).items():
                hook, _, k = key.partition("/")
                if hook not in hooks:
                    raise ValueError(f"tensor {key!r} belongs to no hook")
                hooks[hook][k] = t
        return state, weights, opt_state, rng, best
    except FileNotFoundError:
        why = "missing"
    # torch.load: RuntimeError (a truncated zip), EOFError (an empty file), UnpicklingError (other content)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        # the first sentence: torch's message goes on about how files get corrupted; a KeyError's is the key alone
        why = str(e).splitlines()[0].split(". ")[0] if str(e) and not isinstance(e, KeyError) else repr(e)
    raise UserError(f"--resume: the checkpoint in {saved} is damaged ({name}: {why}); delete it, or run without "
                    "--resume, to start over")


def _hook_keys(hooks) -> dict[str, StepHook]:
    """Each hook under its class name (a second one of a class: `Name#1`): what its saved state is filed under."""
    out, seen = {}, {}
    for h in hooks:
        name = type(h).__name__
        out[name if name not in seen else f"{name}#{seen[name]}"] = h
        seen[name] = seen.get(name, 0) + 1
    return out


def _rng_states(accelerator) -> dict[str, torch.Tensor]:
    """Every process's random state, for the checkpoint: each draws its own dropout, so each resumes with its
    own ("torch", "cuda" for the main process; "torch_1", "cuda_1", ... for the others). A collective call."""
    rng = {"torch": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    if accelerator.num_processes == 1:
        return rng
    from accelerate.utils import gather_object

    return {k if r == 0 else f"{k}_{r}": v.cpu() for r, state in enumerate(gather_object([rng]))
            for k, v in state.items()}


def sync_folder(folder: Path, files: bool = True) -> None:
    """Flush `folder`'s files (with `files`) and its entries to the disk. A rename reaches the disk when the
    kernel gets to it, not after the data it renames: after a power loss or an OS crash the renamed checkpoint or
    model could hold empty or partial files, and the previous one would already be deleted. Where the filesystem
    cannot sync (EINVAL, ENOTSUP: some network and FUSE filesystems, and folders on several) it is skipped; a
    failed write-back (EIO, ENOSPC) is raised, as the data did not reach the disk."""
    for f in sorted(folder.iterdir()) if files else ():
        if f.is_dir() and not f.is_symlink():
            sync_folder(f)
        elif f.is_file() and not f.is_symlink():
            _fsync(f)
    _fsync(folder)


@contextmanager
def disk_errors():
    """A failed write (a full disk, a file-size limit) raised as the OSError it is. safetensors raises its own
    SafetensorError ("I/O error: No space left on device (os error 28)") and torch.save a RuntimeError of its
    zip writer, which the callers' OSError handling (a one-line message, the earlier files kept) missed."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        text = str(e)
        if type(e).__name__ == "SafetensorError" and "I/O error: " in text:
            why = text.split("I/O error: ", 1)[1]
            raise OSError(why.split(" (os error")[0]) from None
        if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
            raise OSError(f"a file could not be written whole: {text.splitlines()[0]}") from None
        raise


def swap_in(tmp: Path, dest: Path) -> None:
    """Put the finished, synced folder `tmp` at `dest`. The earlier `dest` is moved aside to `<dest>.old`, not
    deleted, until the new one is in place: a kill in between leaves it whole there, beside the finished `tmp`."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)  # a dest that is a link is moved aside as the link
    os.replace(tmp, dest)
    sync_folder(dest.parent, files=False)  # the new one in place before the old one goes
    if old.is_symlink():  # which rmtree refuses (quietly, with ignore_errors)
        old.unlink()
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder some systems will not open for reading: nothing to sync through
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _save_checkpoint(ckpt_dir: Path, params, optimizer, scheduler, best_state, rng: dict[str, torch.Tensor],
                     state: dict, hooks: dict[str, dict | None], scaler=None) -> None:
    """Write the whole checkpoint into a fresh folder, then swap it in: a kill leaves the old one intact."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".partial")
    # unmarked before it is emptied: it may be the checkpoint this session resumed from, and a kill midway would
    # leave a folder that _saved_checkpoint prefers to the intact `.old` and that then fails to load
    (tmp / "state.json").unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, tmp / "trainable.safetensors")
        if best_state is not None:
            save_file({n: t.contiguous() for n, t in best_state.items()}, tmp / "best.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **({"scaler": scaler.state_dict()} if scaler is not None else {})}, tmp / "optimizer.pt")
        save_file(rng, tmp / "rng.safetensors")
        hooks = {name: h for name, h in hooks.items() if h is not None}
        tensors = {f"{name}/{k}": v.detach().cpu().contiguous() for name, h in hooks.items()
                   for k, v in h.items() if isinstance(v, torch.Tensor)}
        if tensors:
            save_file(tensors, tmp / "hooks.safetensors")
        state["hooks"] = {name: {k: v for k, v in h.items() if not isinstance(v, torch.Tensor)} for name, h in hooks.items()}
        state = {**state, "sha256": {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}}
        (tmp / "state.json.tmp").write_text(json.dumps(state))
        sync_folder(tmp)  # the files on the disk before the marker is, and the marker before the renames
        os.replace(tmp / "state.json.tmp", tmp / "state.json")  # whole or absent: it marks the folder complete
        sync_folder(tmp, files=False)
    except BaseException:  # a full disk, an interrupt: the half-written folder goes, the earlier checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, ckpt_dir)
