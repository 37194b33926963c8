"""MSLR, MuScleLoRA's multi-scale low-rank adapter, shaped like a PEFT tuner.

- `MSLRConfig`: the settings (scales, inner rank, alpha, the target layer).
- `MSLRLinear`: wraps a frozen base `nn.Linear` and adds s * R diag(kappa) L, every scale in one matmul.
- `inject_mslr` / `merge_mslr`: model-level wiring; `save_adapter` / `apply_adapter` (onto a loaded model, in
  place) and `load_classifier` (a saved folder, base model and adapters): the adapter alone.

Math (spec section 2.2): y = W0 x + b0 + s * R diag(kappa) L x, s = alpha / inner_rank, kappa holds each
scale repeated inner_rank times (a buffer, never trained). Both L and R start kaiming_uniform(a=sqrt(5)),
as the official code does, so the delta is large at step 0 (spec 2.3); a LoRA-style zero init would
not reproduce the published behaviour.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

ADAPTER_DIR = "cleantune_adapter"  # beside PEFT's `adapter/` in a saved model directory
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_NAMES = ("classifier", "score")  # Hugging Face's names for a sequence-classification head

# Published scales and alpha per backbone (spec 2.5). Keys: (family, hidden size).
PUBLISHED = {
    ("bert", 768): ([1, 4, 8, 12, 16, 20, 24, 28], 6.0),
    ("roberta", 768): ([1, 2, 4, 6, 8, 10, 12, 14, 16], 6.0),
    ("bert", 1024): (list(range(1, 10)), 6.0),
    ("roberta", 1024): (list(range(1, 10)), 6.0),
}
CAUSAL_SCALES = ([1, 2, 3, 4], 4.0)  # llama-2-7b and gpt2-xl


@dataclass
class MSLRConfig:
    scales: list[float] = field(default_factory=lambda: [1, 4, 8, 12, 16, 20, 24, 28])
    inner_rank: int = 1
    alpha: float = 6.0
    target_module: str | None = None  # None: the head's penultimate layer (see `default_target`)

    def __post_init__(self):
        if not self.scales or any(not (isinstance(k, (int, float)) and k > 0) for k in self.scales):
            raise UserError(f"scales must be a non-empty list of positive numbers, got {self.scales}")
        if self.inner_rank < 1:
            raise UserError(f"inner_rank must be at least 1, got {self.inner_rank}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.inner_rank  # the official code divides by the inner rank, not by n * inner_rank


def backbone_family(model) -> str:
    """'causal' for decoder LMs used as classifiers (their HF head is `score`), else the encoder family."""
    if hasattr(model, "score") and not hasattr(model, "classifier"):
        return "causal"
    return "roberta" if model.config.model_type in ("roberta", "xlm-roberta", "camembert") else "bert"


def published_mslr(model) -> tuple[list[float], float]:
    """Scales and alpha for a backbone: the published values (spec 2.5) where the paper used that size.

    Rule for other backbones (ours, not the paper's): causal LMs take the LLM values [1,2,3,4], alpha 4;
    encoders take their family's base-size values (BERT [1,4,...,28] / RoBERTa [1,2,4,...,16], alpha 6),
    and 1024 or wider the large-size values [1..9]. MiniLM (a 384-wide distilled BERT with BERT's pooler
    head) therefore gets bert-base's. See docs/muscle-lora.md.
    """
    family = backbone_family(model)
    if family == "causal":
        return list(CAUSAL_SCALES[0]), CAUSAL_SCALES[1]
    size = 1024 if model.config.hidden_size >= 1024 else 768
    scales, alpha = PUBLISHED[(family, size)]
    return list(scales), alpha


def default_target(model) -> str:
    """The head's penultimate linear layer (spec 2.4)."""
    bert = getattr(model, "bert", None)
    if bert is not None and getattr(bert, "pooler", None) is not None:
        return "bert.pooler.dense"
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if head is not None and isinstance(getattr(head, "dense", None), nn.Linear):
        return "classifier.dense" if hasattr(model, "classifier") else "score.dense"
    raise UserError(f"no penultimate head layer known for {type(model).__name__}; set the MSLR target module")


class MSLRLinear(nn.Module):
    """A frozen base linear layer plus the multi-scale low-rank delta."""

    def __init__(self, base_linear: nn.Linear, config: MSLRConfig):
        super().__init__()
        self.base_linear = base_linear  # not `base_layer`: PEFT treats modules with that name as its own tuner layers
        for p in base_linear.parameters():
            p.requires_grad = False
        self.scaling = config.scaling
        rank = len(config.scales) * config.inner_rank
        w = base_linear.weight
        self.mslr_L = nn.Parameter(torch.empty(rank, base_linear.in_features, dtype=w.dtype, device=w.device))
        self.mslr_R = nn.Parameter(torch.empty(base_linear.out_features, rank, dtype=w.dtype, device=w.device))
        kappa = torch.tensor(config.scales, dtype=w.dtype, device=w.device).repeat_interleave(config.inner_rank)
        self.register_buffer("mslr_kappa", kappa, persistent=False)  # derived from the config
        nn.init.kaiming_uniform_(self.mslr_L, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mslr_R, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = nn.functional.linear(x, self.mslr_L) * self.mslr_kappa  # every scale's branch in one matmul
        return self.base_linear(x) + self.scaling * nn.functional.linear(low, self.mslr_R)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.mslr_R * self.mslr_kappa) @ self.mslr_L

    def merged(self) -> nn.Linear:
        base = self.base_linear
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        dtype=base.weight.dtype, device=base.weight.device)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight())
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


class CausalLMHead(nn.Module):
    """The MuScleLoRA head for decoder LMs (spec 2.6): Linear(d -> inner, no bias) -> Dropout(0.1) ->
    Linear(inner -> C, no bias), in place of HF's `score`. HF pools the logits at the last non-pad token."""

    def __init__(self, hidden: int, num_labels: int, inner: int = 16, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden, inner, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(inner, num_labels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.dense(x)))

    def collapsed(self) -> nn.Linear:
        """The head as one d -> C linear layer (exact in eval mode: no nonlinearity, no bias)."""
        dense, out_proj = (m.merged() if isinstance(m, MSLRLinear) else m for m in (self.dense, self.out_proj))
        w = out_proj.weight @ dense.weight
        out = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            out.weight.copy_(w)
        return out


def _head_name(model) -> str | None:
    return next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)


def attach_causal_head(model, inner: int = 16) -> None:
    if backbone_family(model) != "causal":
        raise UserError(f"the d->{inner}->C head is for causal LMs; {type(model).__name__} is not one")
    w = model.score.weight
    model.score = CausalLMHead(w.shape[1], model.config.num_labels, inner).to(dtype=w.dtype, device=w.device)
    register(model, causal_head={"inner": inner})


def inject_mslr(model, config: MSLRConfig) -> MSLRLinear:
    """Replace the target linear layer of `model` by an MSLRLinear around it (in place)."""
    target = config.target_module or default_target(model)
    try:
        base = model.get_submodule(target)
    except AttributeError:
        raise UserError(f"MSLR target module '{target}' not found in {type(model).__name__}") from None
    if not isinstance(base, nn.Linear):
        raise UserError(f"MSLR target module '{target}' is a {type(base).__name__}, not a Linear layer")
    layer = MSLRLinear(base, config)
    parent, _, child = target.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    register(model, mslr={**asdict(config), "target_module": target})
    return layer


def mslr_layers(model) -> dict[str, MSLRLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MSLRLinear)}


def merge_mslr(model) -> None:
    """In place: every MSLRLinear becomes a plain Linear (W0 + delta), the causal head one d -> C Linear.
    The result is a plain Hugging Face model (its config unchanged) with identical eval-mode outputs."""
    if isinstance(getattr(model, "score", None), CausalLMHead):
        model.score = model.score.collapsed()
    for name, layer in mslr_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.merged())
    model.__dict__.pop("cleantune_export", None)
    model.__dict__.pop("_cleantune_adapter", None)


# ---------------------------------------------------------------- save / load of the adapter alone


def adapter_state(model) -> dict[str, torch.Tensor]:
    """What the adapter adds to its base checkpoint: the MSLR factors, the head, and any other layer the base
    checkpoint lacks (DistilBERT's pre_classifier when the base has no head). The head is frozen at a random
    init (or newly built for causal LMs), so like PEFT's modules_to_save it travels with the adapter."""
    state = {}
    for name, layer in mslr_layers(model).items():
        state[f"{name}.mslr_L"], state[f"{name}.mslr_R"] = layer.mslr_L, layer.mslr_R
    head = _head_name(model)
    if head is not None:
        for n, t in getattr(model, head).state_dict().items():
            if "mslr_" not in n:
                state[f"{head}.{n}"] = t
    tensors = dict(model.state_dict())
    for key in getattr(model, "cleantune_new_keys", ()):  # set by models.load_model
        parent, _, leaf = key.rpartition(".")
        # the layer alone, inside MSLR (which apply_adapter rebuilds first), or inside a LoRA layer (saved before
        # LoRA's merge, so its W0, under the plain name: apply_adapter runs before PEFT wraps it again)
        mslr = f"{parent}.base_linear.{leaf}"
        for name, saved_as in ((key, key), (mslr, mslr), (f"{parent}.base_layer.{leaf}", key)):
            if name in tensors and saved_as not in state:
                state[saved_as] = tensors[name]
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model, out_dir: str | Path, base_model: str | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(getattr(model, "_cleantune_adapter", {}))
    meta["base_model"] = base_model or meta.get("base_model") or model.config._name_or_path
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    save_file(adapter_state(model), out / WEIGHTS_FILE)
    return out


def _read_config(adapter_dir: Path) -> dict:
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_FILE} (not a cleantune adapter)")
    try:
        meta = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{adapter_dir / CONFIG_FILE}: not a valid adapter config ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{adapter_dir / CONFIG_FILE}: not a valid adapter config (not a JSON object)")
    return meta


def apply_adapter(model, adapter_dir: str | Path) -> None:
    """Rebuild the adapter's modules in a freshly loaded base `model` and load its weights (in place)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    meta = _read_config(adapter_dir)
    if meta.get("causal_head"):
        attach_causal_head(model, meta["causal_head"]["inner"])
    if meta.get("mslr"):
        inject_mslr(model, MSLRConfig(**meta["mslr"]))
    try:
        state = load_file(adapter_dir / WEIGHTS_FILE)
    except Exception as e:  # safetensors' own error type for a cut or damaged file, OSError for a missing one
        raise UserError(f"{adapter_dir / WEIGHTS_FILE}: cannot read the adapter's weights ({e})") from None
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(state) - set(params))
    if missing:
        raise UserError(f"{adapter_dir}: adapter tensor '{missing[0]}' does not fit {type(model).__name__}")
    wrong = next((n for n, t in state.items() if t.shape != params[n].shape), None)
    if wrong is not None:
        raise UserError(f"{adapter_dir}: adapter tensor '{wrong}' has shape {tuple(state[wrong].shape)}, the model's "
                        f"has {tuple(params[wrong].shape)} (another base model?)")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    register(model, **{k: meta[k] for k in ("base_model", "lora") if k in meta})  # saved again, said again


def load_classifier(path: str | Path, base_model: str | None = None):
    """A Classifier from a saved model directory's adapters alone (base weights + PEFT `adapter/` +
    `cleantune_adapter/`), unmerged: what `Classifier.from_pretrained` gives merged."""
    from ..models import LABELS_FILE, Classifier, check_model_folder, load_model, load_tokenizer, read_labels

    path = Path(path)
    check_model_folder(path)
    meta_file = path / ADAPTER_DIR / CONFIG_FILE
    if not meta_file.is_file():
        raise UserError(f"{path}: no {ADAPTER_DIR}/{CONFIG_FILE} (saved without a cleantune adapter)")
    if not (path / LABELS_FILE).is_file():
        raise UserError(f"{path}: no {LABELS_FILE} (not a model folder saved by cleantune)")
    label_names, max_length = read_labels(path / LABELS_FILE)
    meta = _read_config(path / ADAPTER_DIR)
    if meta.get("lora") and not (path / "adapter").is_dir():  # loaded without it, it predicts otherwise, silently
        raise UserError(f"{path}: its model was trained with a PEFT LoRA adapter, and adapter/ is missing")
    base = base_model or meta.get("base_model")
    if not isinstance(base, str):
        raise UserError(f"{meta_file}: names no base model (pass base_model=)")
    tokenizer = load_tokenizer(str(path), str(path))
    label = base if base_model else f"{base} (the base model {meta_file} names; pass base_model= where it moved)"
    model = load_model(base, label_names, label=label, tokenizer=tokenizer)
    apply_adapter(model, path / ADAPTER_DIR)
    if (path / "adapter").is_dir():
        from peft import PeftModel

        from ..defenses.lora import quiet_peft

        with quiet_peft():
            model = PeftModel.from_pretrained(model, path / "adapter")
    model.eval()
    return Classifier(model, tokenizer, label_names, max_length)


def _export(model, out_dir: str | Path) -> None:
    """Classifier.save_pretrained's hook: write the adapter to out_dir, then merge it (in place). A fully
    fine-tuned model (`ga` on a causal LM, registered with full_finetune) writes none: its base weights
    changed, so the head alone on the base checkpoint would be another model."""
    if writes_adapter(model):
        save_adapter(model, Path(out_dir) / ADAPTER_DIR)
    merge_mslr(model)


def writes_adapter(model) -> bool:
    """Whether saving `model` writes a cleantune adapter (the head, MSLR) beside PEFT's."""
    return hasattr(model, "cleantune_export") and not model._cleantune_adapter.get("full_finetune")


def register(model, **entries) -> None:
    """Record adapter settings on the model (`base_model`, `mslr`, `causal_head`, `full_finetune`) and hook it into
    Classifier.save_pretrained, which then saves the adapter (and the frozen head) and merges it for export."""
    model._cleantune_adapter = {**getattr(model, "_cleantune_adapter", {}), **entries}
    model.cleantune_export = types.MethodType(_export, model)
