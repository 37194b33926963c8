"""MuScleLoRA (Wu et al., ACL 2024) and its ablations: LoRA + MSLR + gradient alignment (GA).

Spec: shared/specs/muscle-lora.md. Components by defense name:

    ga          full fine-tuning + GA                 ("OnlyGA")
    ga-lora     LoRA + GA, head frozen
    lora-mslr   LoRA + MSLR, head frozen (no GA)       ("OnlyMSLR")
    muscle-lora LoRA + MSLR + GA, head frozen
    lora        (defenses/lora.py; `train_head=False` is the paper's frozen-head LoRA baseline)

Gradient alignment is a StepHook of the one training loop: after the backward pass on the (possibly
poisoned) batch it computes the gradient of one clean reference batch and replaces every trainable
tensor's gradient by its projection onto the reference gradient (spec 3.2), before clipping.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch

from ..adapters import mslr as A
from ..data import TextDataset
from ..errors import UserError
from ..models import model_name
from ..training import StepContext, StepHook, encode, make_batch
from .base import Defense
from .lora import apply_lora

# Per-family values the paper ships (spec 3.3, 5, 16): (PLM, causal LM).
PLM_GA = {"ref_samples": 96, "ga_epoch": 1, "max_raw_grad_ratio": 0.1, "min_ref_loss": 0.4}
LLM_GA = {"ref_samples": 128, "ga_epoch": 0, "max_raw_grad_ratio": 0.0, "min_ref_loss": 0.0}
PLM_LORA = {"lora_r": 8, "lora_alpha": 32}
LLM_LORA = {"lora_r": 2, "lora_alpha": 8}
PUBLISHED_LR = {"encoder": 2e-5, "causal": 1e-5}
# Backbones the paper did not use, keyed (family, hidden size): values chosen on clean SST-2 dev accuracy
# by benchmarks/muscle_tune.py (no attack, no test data): alpha on 1,000 samples x 4 epochs, lr at the
# default budget (full train split, 10 epochs); docs/muscle-lora.md, "The MiniLM settings".
# MiniLM's pretrained pooler is small (weight std 0.009, a third of a default init's 0.03), so the published
# alpha 6 makes the MSLR delta 175x the base output at init and saturates 82% of the tanh units.
TUNED = {("bert", 384): {"lr": 1e-3, "mslr_alpha": 0.1}}


# ---------------------------------------------------------------- gradient alignment


def project(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """|<g, r>| / ||r||^2 * r: the length of g's projection onto r, pointing along +r (spec 3.2; the
    absolute value is the official code's, so an opposing poisoned gradient still steps the clean way).
    The official code computes it as |cos(g, r) * ||g|| / ||r||| * r with torch.cosine_similarity, which divides
    by max(||g||, 1e-8) * max(||r||, 1e-8): a tensor whose gradient or reference gradient is shorter than 1e-8
    (references memorised, a LoRA factor still near 0) takes a step shrunk by that norm / 1e-8, a clamp the
    spec's formula leaves out. Those tensors, and any whose ||r||^2 is not a normal float32, are computed in
    float64 (the same formula); every other tensor takes the float32 path, bit for bit the spec's formula."""
    den = r.flatten().pow(2).sum()
    return _project(g, r, den, bool(_plain(den, g.flatten().pow(2).sum(), r.numel(), r.dtype)))


COS_EPS = 1e-8  # torch.cosine_similarity's default eps, which the official projection runs through


def _plain(den: torch.Tensor, gden: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Whether the float32 formula gives the official step: both norms at least COS_EPS (no clamp), and
    ||r||^2 a normal float32 (subnormal squares lose their precision long before the sum reaches 0)."""
    return ((den > numel * torch.finfo(dtype).tiny * 1e4) & torch.isfinite(den)
            & (den >= COS_EPS ** 2) & (gden >= COS_EPS ** 2))


def _project(g: torch.Tensor, r: torch.Tensor, den: torch.Tensor, plain: bool) -> torch.Tensor:
    if plain:
        return (g.flatten().double() @ r.flatten().double()).abs().to(r.dtype) / den * r
    g64, r64 = g.flatten().double(), r.flatten().double()
    g_norm, r_norm = g64.norm(), r64.norm()
    cos = (g64 @ r64) / (g_norm.clamp_min(COS_EPS) * r_norm.clamp_min(COS_EPS))
    return ((cos * g_norm / r_norm).abs() * r.double()).to(r.dtype)


def ga_mode(mean_ref_norm: float, ref_loss: float, epoch: int, epochs: int, *, min_ref_grad_norm: float,
            min_ref_loss: float, ga_epoch: int, max_raw_grad_ratio: float) -> tuple[str, float]:
    """The official gating: ('project', 0), ('mix', mu) or ('raw', 1). Epochs count from 0."""
    if mean_ref_norm > min_ref_grad_norm and ref_loss > min_ref_loss:
        return "project", 0.0
    if max_raw_grad_ratio > 0 and epoch >= ga_epoch:
        return "mix", max_raw_grad_ratio * (epoch - ga_epoch) / max(1, epochs - ga_epoch)
    return "raw", 1.0


def align(g: torch.Tensor, r: torch.Tensor | None, mode: str, mu: float) -> torch.Tensor:
    """The new gradient of one tensor. Tensors where g or r is zero (or r missing) keep g."""
    return align_all([g], [r], mode, mu)[0]


# Tensors up to PyTorch's parallel grain (at::internal::GRAIN_SIZE) are reduced by one thread, so a row of a
# stacked matrix sums to the same float32 bits as the tensor alone; larger ones are split across threads and
# keep a matrix of their own (a 1-row view, no copy), whose reduction is the tensor's.
STACK_MAX_NUMEL = 32768


def ref_groups(refs: list[torch.Tensor | None]) -> list[tuple[list[int], torch.Tensor]]:
    """The reference gradients as (indices, k x n matrix) groups of equal size, dtype and device: a step's
    per-tensor reductions become a few row-wise ones. A MuScleLoRA step has about 27 small tensors, and on a
    GPU, where a MiniLM step is bound by kernel launches, 20 launches per tensor were a fifth of the step."""
    by_key: dict[tuple, list[int]] = {}
    for i, r in enumerate(refs):
        if r is not None:
            key = (r.numel(), r.dtype, r.device) if r.numel() <= STACK_MAX_NUMEL else (i,)
            by_key.setdefault(key, []).append(i)
    return [(idx, _rows([refs[i] for i in idx])) for idx in by_key.values()]


def _rows(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].reshape(1, -1) if len(ts) == 1 else torch.stack([t.reshape(-1) for t in ts])


def align_all(grads: list[torch.Tensor | None], refs: list[torch.Tensor | None], mode: str, mu: float,
              groups: list[tuple[list[int], torch.Tensor]] | None = None,
              counts: dict[str, int] | None = None) -> list[torch.Tensor | None]:
    """align() for every tensor of a step, as row-wise operations over `ref_groups` and with all the
    per-tensor tests read back in one host sync (a GPU stalls at every sync). The float32 path is the
    published formula row by row: the same bits as tensor by tensor on a CPU, up to the float64 dot
    product's summation order, which changes its float32 rounding about once in 1e8 tensors."""
    out = list(grads)
    if mode == "raw":
        return out
    work = []
    for idx, R in ref_groups(refs) if groups is None else groups:
        keep = [j for j, i in enumerate(idx) if grads[i] is not None]
        if not keep:
            continue
        if len(keep) < len(idx):
            idx, R = [idx[j] for j in keep], R[keep]
        G = _rows([grads[i] for i in idx])
        den = R.pow(2).sum(1)
        plain = _plain(den, G.pow(2).sum(1), R.shape[1], R.dtype)
        work.append((idx, G, R, den, torch.stack([G.any(1), R.any(1), plain], 1)))
    if not work:
        return out
    tests = torch.cat([w[-1] for w in work]).tolist()
    k = 0
    for idx, G, R, den, _ in work:
        coef = torch.bmm(G.double().unsqueeze(1), R.double().unsqueeze(2)).view(-1).abs().to(R.dtype) / den
        A = coef[:, None] * R
        if mode == "mix":
            A = (1 - mu) * A + mu * G
        for j, i in enumerate(idx):
            g_nonzero, r_nonzero, plain = tests[k]
            k += 1
            if not (g_nonzero and r_nonzero):
                continue
            if counts is not None:
                counts["aligned"] = counts.get("aligned", 0) + 1
                counts["clamped"] = counts.get("clamped", 0) + (not plain)
            if plain:
                out[i] = A[j].view_as(grads[i])
            else:  # the float64 path, tensor by tensor (rare: a norm under COS_EPS, memorised references)
                g_a = _project(grads[i], refs[i], den[j], False)
                out[i] = g_a if mode == "project" else (1 - mu) * g_a + mu * grads[i]
    return out


def check_refs(n: int, n_dev: int) -> None:
    if n >= n_dev:
        raise UserError(f"ref_samples={n} leaves no clean dev sample for model selection ({n_dev} given)")


def split_refs(clean_dev: TextDataset, n: int, seed: int) -> tuple[TextDataset, TextDataset]:
    """(references, the rest): a seeded random split of the clean dev set. The references are drawn with
    their own RNG, so every variant gets the same ones (the official draw depends on model construction)."""
    check_refs(n, len(clean_dev))
    chosen = set(random.Random(f"ga-refs-{seed}").sample(range(len(clean_dev)), n))
    return (clean_dev.subset(sorted(chosen)),
            clean_dev.subset(i for i in range(len(clean_dev)) if i not in chosen))


def _mean_over_processes(accelerator, loss: float, grads: list[torch.Tensor | None]):
    """The reference loss and gradients averaged over processes, in one all-reduce. Every process draws the
    same reference batch, but its forward runs in train mode with its own dropout: unaveraged, each process
    would gate and project the (already averaged) training gradient differently and the replicas drift apart."""
    present = [g.reshape(-1).float() for g in grads if g is not None]
    flat = accelerator.reduce(torch.cat(present + [torch.tensor([loss], device=accelerator.device)]), "mean")
    out, at = [], 0
    for g in grads:
        if g is not None:
            out.append(flat[at: at + g.numel()].view_as(g).to(g.dtype))
            at += g.numel()
        else:
            out.append(None)
    return float(flat[-1]), out


class GradientAlignment(StepHook):
    """Spec 3.2. One reference batch (the first `batch_size` of a fresh seeded shuffle of the references)
    per optimizer step, forward in train mode as the official code; batch-mean gradients only."""

    def __init__(self, tokenizer, refs: TextDataset, *, batch_size: int, max_length: int, seed: int,
                 min_ref_loss: float, min_ref_grad_norm: float, ga_epoch: int, max_raw_grad_ratio: float):
        self.refs = refs
        self.ids = encode(tokenizer, refs.texts, max_length)
        self.pad_id = tokenizer.pad_token_id
        self.batch_size, self.seed = batch_size, seed
        self.gating = dict(min_ref_grad_norm=min_ref_grad_norm, min_ref_loss=min_ref_loss, ga_epoch=ga_epoch,
                           max_raw_grad_ratio=max_raw_grad_ratio)
        self._reset()

    def _reset(self):
        self.counts = {"project": 0, "mix": 0, "raw": 0}
        self.tensors = {"aligned": 0, "clamped": 0}
        self.ref_loss_sum = 0.0

    def reference_gradients(self, model, params: list[torch.nn.Parameter], step: int, device,
                            need_grads=None) -> tuple[float, list[torch.Tensor | None] | None]:
        """(reference loss, one gradient per parameter); the gradients are None where `need_grads(loss)` says
        the loss alone decides the step."""
        # modulo 2**64: the seeds training accepts (check_seed: -2**63 .. 2**64) times 1_000_003 overflow what
        # manual_seed takes (a ValueError at the first step); torch reads a negative seed modulo 2**64 too, so every
        # seed that worked before draws the same batches
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**64)
        idx = torch.randperm(len(self.ids), generator=g)[: self.batch_size].tolist()
        batch = {k: v.to(device) for k, v in make_batch([self.ids[i] for i in idx], self.pad_id).items()}
        y = torch.tensor([self.refs.labels[i] for i in idx], device=device)
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), y)
        if need_grads is not None and not need_grads(loss.item()):
            return loss.item(), None
        # one gradient per parameter, None where unused: pairing by parameter, not by position (the official
        # zip silently misaligns when a trainable tensor gets no gradient)
        return loss.item(), list(torch.autograd.grad(loss, params, allow_unused=True))

    def after_backward(self, ctx: StepContext) -> None:
        model = ctx.model
        params = [p for p in model.parameters() if p.requires_grad]
        gate = functools.partial(ga_mode, epoch=ctx.epoch, epochs=ctx.settings.epochs, **self.gating)
        if ctx.accelerator is not None and ctx.accelerator.num_processes > 1:
            # every process gates on the averaged loss: each computes its gradients for the one all-reduce
            ref_loss, refs = self.reference_gradients(model, params, ctx.step, params[0].device)
            ref_loss, refs = _mean_over_processes(ctx.accelerator, ref_loss, refs)
        else:
            # below min_ref_loss the norm cannot make the step project: a raw step leaves the reference backward
            # unused (skipping it changes no number: a backward draws no random numbers)
            ref_loss, refs = self.reference_gradients(model, params, ctx.step, params[0].device,
                                                      need_grads=lambda loss: gate(math.inf, loss)[0] != "raw")
        if refs is None:
            mode, mu = "raw", 1.0
        else:
            groups = ref_groups(refs)
            norms = torch.cat([R.norm(dim=1) for _, R in groups]).double().tolist() if groups else []  # one sync
            norms = [n for n in norms if n > 0]
            mode, mu = gate(sum(norms) / len(norms) if norms else 0.0, ref_loss)
        if mode != "raw":
            with torch.no_grad():  # refs[i] belongs to params[i] by construction
                new_grads = align_all([p.grad for p in params], refs, mode, mu, groups, self.tensors)
                changed = [(p.grad, new) for p, new in zip(params, new_grads) if new is not p.grad]
                if changed:
                    torch._foreach_copy_(*map(list, zip(*changed)))
        self.counts[mode] += 1
        self.ref_loss_sum += ref_loss
        steps = sum(self.counts.values())
        ctx.logs.update({f"ga_{k}": v / steps for k, v in self.counts.items()})
        ctx.logs["ga_ref_loss"] = self.ref_loss_sum / steps
        # the share of aligned tensors whose gradient or reference gradient was shorter than 1e-8 (the official
        # cosine's clamp shrank their step): near 0 until the references are memorised
        ctx.logs["ga_clamped"] = self.tensors["clamped"] / max(1, self.tensors["aligned"])

    def on_epoch_end(self, ctx: StepContext) -> None:
        self._reset()


# ---------------------------------------------------------------- the defenses


@dataclass
class MuScleLoRA(Defense):
    """LoRA on the attention projections + MSLR on the head's penultimate layer + gradient alignment.

    Settings left at None take the paper's value for the backbone family (spec 2.5, 3.3, 16):
    encoders (BERT, RoBERTa, MiniLM): LoRA r8/alpha32, 96 refs, GA epoch 1, raw-gradient ratio 0.1, min
    ref loss 0.4; causal LMs (GPT-2, Llama): LoRA r2/alpha8, 128 refs, GA epoch 0, ratio 0, min ref loss 0,
    and the d->16->C head. `lr` unset: 2e-5 (encoders), 1e-5 (causal LMs), or TUNED for the backbone (MiniLM
    1e-3 and MSLR alpha 0.1). For causal LMs also pass the paper's `--epochs 5 --batch-size 16`.
    The head is frozen at its random init, as in the official code (`train_head=True` trains it).
    """

    epochs: int = 10
    lr: float | None = None  # None: 2e-5 (encoders), 1e-5 (causal LMs), or the TUNED value for the backbone
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    # LoRA
    lora_r: int | None = None
    lora_alpha: int | None = None
    target_modules: str | list[str] | None = None  # None: PEFT's default (query,value / q_proj,v_proj / c_attn)
    train_head: bool = False
    head_inner: int = 16  # causal LMs: width of the d->inner->C head
    # MSLR
    scales: list[float] | None = None  # None: spec 2.5 per backbone, see adapters.mslr.published_mslr
    inner_rank: int = 1
    mslr_alpha: float | None = None
    mslr_target: str | None = None  # None: the head's penultimate layer
    # gradient alignment
    ref_samples: int | None = None
    min_ref_loss: float | None = None
    min_ref_grad_norm: float = 5e-7
    ga_epoch: int | None = None
    max_raw_grad_ratio: float | None = None

    name = "muscle-lora"
    bounds = {**{name: "(0, inf)" for name in ("lora_r", "lora_alpha", "head_inner", "scales", "inner_rank", "mslr_alpha",
                                            "ref_samples")},
              # 0 is meaningful: always project, or GA from the first epoch
              **{name: "[0, inf)" for name in ("min_ref_loss", "min_ref_grad_norm", "max_raw_grad_ratio", "ga_epoch")}}
    clean_data: ClassVar[str] = ("clean dev: `ref_samples` (96) labelled samples for gradient alignment, "
                                 "the rest for model selection")
    components: ClassVar[tuple[str, ...]] = ("lora", "mslr", "ga")

    _GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "lora": ("lora_r", "lora_alpha", "target_modules", "train_head"),
        "mslr": ("scales", "inner_rank", "mslr_alpha", "mslr_target"),
        "ga": ("ref_samples", "min_ref_loss", "min_ref_grad_norm", "ga_epoch", "max_raw_grad_ratio"),
    }

    def __post_init__(self):
        super().__post_init__()  # first: the values converted to the fields' types
        # the Python API constructs directly: an option of a left-out component would be silently ignored
        for component, names in self._GROUPS.items():
            set_here = [n for n in names if component not in self.components
                        and getattr(self, n) != MuScleLoRA.__dataclass_fields__[n].default]
            if set_here:
                raise UserError(f"defense '{self.name}' has no {component.upper()} component: option "
                                f"{set_here[0]} does not apply to it")

    @classmethod
    def _unused(cls) -> set[str]:
        return {f for c, fs in cls._GROUPS.items() if c not in cls.components for f in fs}

    @classmethod
    def option_names(cls) -> set[str]:
        return super().option_names() - cls._unused()

    def settings(self) -> dict:
        """Only the settings of the components this variant uses."""
        return {k: v for k, v in asdict(self).items() if k not in self._unused()}

    def resolve(self, model) -> dict:
        """The settings with the per-backbone defaults filled in."""
        family = A.backbone_family(model)
        causal = family == "causal"
        tuned = TUNED.get((family, model.config.hidden_size), {})
        out = dict(self.settings())
        for k, v in {**(LLM_GA if causal else PLM_GA), **(LLM_LORA if causal else PLM_LORA)}.items():
            if k in out and out[k] is None:
                out[k] = v
        if out["lr"] is None:
            published = PUBLISHED_LR["causal" if causal else "encoder"]
            if "lora" not in self.components:  # "ga": full fine-tuning, at the backbone's fine-tuning lr
                out["lr"] = Defense.lr if tuned else published
            else:
                out["lr"] = tuned.get("lr", published)
        if "mslr" in self.components:
            scales, alpha = A.published_mslr(model)
            out["scales"] = out["scales"] or scales
            if out["mslr_alpha"] is None:
                out["mslr_alpha"] = tuned.get("mslr_alpha", alpha)
        return out

    def train_settings(self):
        return Defense.train_settings(replace(self, lr=self.resolved_["lr"]))

    def prepare_model(self, model, tokenizer, train_data):
        self.resolved_ = r = self.resolve(model)
        shared = set(asdict(Defense())) - {"lr"}  # lr is resolved per backbone, so it is reported
        self.extra_metrics_ = {"resolved_settings": {k: v for k, v in r.items() if k not in shared}}
        if A.backbone_family(model) == "causal":
            A.attach_causal_head(model, self.head_inner)
        elif self.head_inner != MuScleLoRA.head_inner:  # taken and ignored, it still made another run id
            raise UserError(f"defense '{self.name}': option head_inner applies to causal LMs only (the head "
                            f"MuScleLoRA adds to them); --model {self.model} keeps its own classification head")
        if "lora" not in self.components:
            if hasattr(model, "cleantune_export"):  # the causal head: collapsed at export, no adapter written
                A.register(model, full_finetune=True)
            return model  # full fine-tuning ("OnlyGA"): every parameter trains, the head included
        head = getattr(model, "classifier", None) or getattr(model, "score")
        for p in head.parameters():
            p.requires_grad = False  # the official code freezes the head at its random init
        # the frozen head travels with the saved adapter; a local folder is recorded by its absolute path
        A.register(model, base_model=model_name(self.model), lora=True)  # load_classifier needs adapter/ too
        trainable = []
        if "mslr" in self.components:
            layer = A.inject_mslr(model, A.MSLRConfig(r["scales"], r["inner_rank"], r["mslr_alpha"], r["mslr_target"]))
            trainable += [layer.mslr_L, layer.mslr_R]
        if r["train_head"]:  # after the injection: where MSLR wraps a head layer (RoBERTa, causal LMs), its W0 stays frozen
            trainable += [p for n, p in head.named_parameters() if ".base_linear." not in f".{n}" and "mslr_" not in n]
        model = apply_lora(model, r["lora_r"], r["lora_alpha"], 0.0, r["target_modules"], modules_to_save=False)
        for p in trainable:  # PEFT froze every non-LoRA parameter
            p.requires_grad = True
        return model

    def check_dev(self, n_dev: int) -> None:
        if "ga" in self.components and self.ref_samples is not None:  # else the backbone's 96 or 128, at fit
            check_refs(self.ref_samples, n_dev)

    def _refs(self, clean_dev):
        if clean_dev is None or len(clean_dev) == 0:
            raise UserError(f"defense '{self.name}' needs clean labelled dev data (--dev) for gradient alignment")
        return split_refs(clean_dev, self.resolved_["ref_samples"], self.seed)

    def hooks(self, model, tokenizer, train_data, clean_dev):
        if "ga" not in self.components:
            return ()
        r = self.resolved_
        return (GradientAlignment(tokenizer, self._refs(clean_dev)[0], batch_size=self.batch_size,
                                  max_length=self.max_length, seed=self.seed, min_ref_loss=r["min_ref_loss"],
                                  min_ref_grad_norm=r["min_ref_grad_norm"], ga_epoch=r["ga_epoch"],
                                  max_raw_grad_ratio=r["max_raw_grad_ratio"]),)

    def selection_data(self, clean_dev):
        if "ga" not in self.components:
            return clean_dev
        return self._refs(clean_dev)[1]  # the references never pick the epoch


@dataclass
class LoRAMSLR(MuScleLoRA):
    """Ablation: LoRA + MSLR, no gradient alignment (the official "OnlyMSLR")."""

    name = "lora-mslr"
    clean_data: ClassVar[str] = "clean dev: model selection only"
    components: ClassVar[tuple[str, ...]] = ("lora", "mslr")


@dataclass
class GALoRA(MuScleLoRA):
    """Ablation: LoRA + gradient alignment, no MSLR."""

    name = "ga-lora"
    components: ClassVar[tuple[str, ...]] = ("lora", "ga")


@dataclass
class GA(MuScleLoRA):
    """Ablation: full fine-tuning + gradient alignment (the official "OnlyGA")."""

    name = "ga"
    components: ClassVar[tuple[str, ...]] = ("ga",)
