"""BTU, Backdoor Token Unlearning (Jiang et al., AAAI 2025), spec: shared/specs/btu.md.

Pipeline: expose suspicious tokens with three embedding-drift rankings (A: a shallow embedding-only
classifier; B: the same after removing A's tokens; C: the full model with only the word embeddings
trainable), take the union of the top-k lists, train the victim model normally, then overwrite the
suspicious rows' strongly-moved dimensions with the pretrained padding embedding; optionally tune on
a few clean dev samples.

`btu_mode="faithful"` reproduces the official code where it changes numbers; `btu_mode="default"` keeps
the algorithm and fixes its quirks. (Not `mode`: the run config's `mode` is the attack's poisoning mode.) Each difference is named in docs/btu.md and at the line that makes it.
Every training stage runs through `cleantune.training.train`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import TextDataset
from ..errors import UserError
from ..models import Classifier, check_max_length, load_model, load_tokenizer, max_positions, model_skeleton
from ..training import StepHook, TrainSettings, num_processes, seed_everything, train
from .base import Defense
from .common import with_stages

MODES = ("default", "faithful")
# Official values (spec section 5). k = int(0.0005 * 35022): the code's typo for BERT's 30522.
FAITHFUL = dict(epochs=1, lr=2e-5, batch_size=64, warmup_ratio=0.0, max_length=512, max_grad_norm=0.0,
                lr_schedule="constant", k=17, guard=False)
# The default victim trains exactly like `finetune` (Defense's defaults), so btu_stages.no_defense is the
# plain fine-tuning point on the same data.
DEFAULT = dict(epochs=3, lr=Defense.lr, batch_size=32, warmup_ratio=0.06, max_length=128, max_grad_norm=1.0,
               lr_schedule="linear", k=None, guard=True)
# The shallow passes' learning rate. The official 2e-5 moves every frequent token about as far as the
# trigger in one epoch under Adam once padding is no longer pooled; at 1e-3 the frequent words converge
# (mixed-sign gradients) while a perfectly label-predictive trigger keeps moving (docs/btu.md).
FAITHFUL_EXPOSE_LR, DEFAULT_EXPOSE_LR = 2e-5, 1e-3
COLLATERAL_DOC_FREQ = 0.01  # a non-trigger token in at least 1% of training samples counts as task collateral


# ---------------------------------------------------------------- tokens


class TokenView:
    """Stands in for the tokenizer inside `train`: every text is tokenised once (fast tokenizer, batched)
    and cached across stages; `drop` removes token ids after tokenisation (token-level removal, pass B)."""

    def __init__(self, tokenizer, cache: dict | None = None, drop=()):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.cache = {} if cache is None else cache
        self.drop = frozenset(int(i) for i in drop)

    def ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        missing = list({t for t in texts if (t, max_length) not in self.cache})
        if missing:
            enc = self.tokenizer(missing, truncation=True, max_length=max_length)["input_ids"]
            self.cache.update({(t, max_length): x for t, x in zip(missing, enc)})
        out = [self.cache[(t, max_length)] for t in texts]
        if self.drop:
            out = [[i for i in x if i not in self.drop] for x in out]
        return out

    def __call__(self, texts, truncation=True, max_length=512, **_):
        return {"input_ids": self.ids(list(texts), max_length)}


OLID_PLACEHOLDER = "@USER"  # OLID replaces every user mention with it


def special_ids(tokenizer, faithful: bool, texts=()) -> list[int]:
    """Ids never ranked. The official code drops only [CLS]/[SEP] (PAD gets no gradient there), and on OLID
    (a dataset named `offen*`) also the pieces of its @USER placeholder, '@' and 'user' (spec 4 step 1): a
    defense does not see the dataset's name, so faithful mode drops them when the training `texts` hold the
    placeholder. The default drops every special token except UNK, which can carry an out-of-vocabulary trigger."""
    if faithful:
        ids = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
        if any(OLID_PLACEHOLDER in t for t in texts):
            ids |= set(trigger_token_ids(tokenizer, [OLID_PLACEHOLDER]))
    else:
        ids = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    return sorted(i for i in ids if i is not None)


def trigger_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The word-pieces an inserted trigger word becomes: alone and after a space (BPE vocabularies
    such as RoBERTa's mark a word-initial piece with a leading space)."""
    ids: set[int] = set()
    for w in words:
        for variant in (w, " " + w):
            ids.update(tokenizer(variant, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def substring_removed(texts: list[str], strings: list[str]) -> list[str]:
    """The official pass-B removal: every occurrence of each string deleted, inside words too (spec 8 #7)."""
    out = []
    for t in texts:
        for s in strings:
            t = t.replace(s, "")
        out.append(t)
    return out


def doc_stats(ids: list[list[int]], labels: list[int], vocab: int, num_labels: int) -> torch.Tensor:
    """[vocab, num_labels] counts of samples that contain each token, per label (one bincount)."""
    rows, cols = [], []
    for x, y in zip(ids, labels):
        u = set(x)
        rows += u
        cols += [y] * len(u)
    flat = torch.tensor(rows, dtype=torch.long) * num_labels + torch.tensor(cols, dtype=torch.long)
    return torch.bincount(flat, minlength=vocab * num_labels).view(vocab, num_labels)


# ---------------------------------------------------------------- exposure


class _CompactLookup(nn.Module):
    """Vocabulary ids -> rows of the compact trainable matrix (ShallowClassifier)."""

    def __init__(self, word: nn.Embedding, lut: torch.Tensor):
        super().__init__()
        self.word = word
        self.register_buffer("lut", lut, persistent=False)

    def forward(self, input_ids):
        return self.word(self.lut[input_ids])


class ShallowClassifier(nn.Module):
    """Pass A/B model: the backbone's embedding module (word + position (+ type) embeddings, LayerNorm,
    dropout), mean-pooled, then a fresh linear head. `pool_padding` mirrors the official code, which pads
    every sample to `pad_to` positions and averages over all of them (spec section 8 #8).

    Only the rows of `rows` (the tokens the data uses) are held as a trainable matrix: AdamW then updates
    those instead of the whole vocabulary every step (the official model also decays unused rows by
    weight decay alone, a uniform shrink that does not reorder the ranking). `full_weight()` scatters
    them back into a vocabulary-sized matrix for the drift ranking.
    """

    def __init__(self, backbone, num_labels: int, pad_id: int, pool_padding: bool, pad_to: int, rows: torch.Tensor):
        super().__init__()
        word = backbone.get_input_embeddings()
        module = getattr(backbone.base_model, "embeddings", None)
        # The full embedding module where the architecture has one around the word embeddings (BERT,
        # RoBERTa, ...); elsewhere (GPT-2 style) the word embeddings alone.
        self.embeddings = module if getattr(module, "word_embeddings", None) is word else None
        self.rows = rows
        lut = torch.full((word.weight.shape[0],), int((rows == pad_id).nonzero()[0, 0]), dtype=torch.long)
        lut[rows] = torch.arange(len(rows))
        self.register_buffer("lut", lut, persistent=False)
        # the backbone's padding row takes no gradient, as in the official model's embedding (padding_idx): else
        # faithful mode, which pools over [PAD] positions, trains it and ranks it among the suspicious tokens
        pad_row = int(lut[word.padding_idx]) if word.padding_idx is not None else None
        self.word = nn.Embedding.from_pretrained(word.weight.detach()[rows].clone(), freeze=False, padding_idx=pad_row)
        if self.embeddings is not None:
            # the compact matrix stands in for the word embeddings, behind the same call: some embedding
            # modules (DistilBERT's) always look the ids up themselves and take no inputs_embeds
            self.embeddings.word_embeddings = _CompactLookup(self.word, lut)
        self.base_weight = word.weight.detach()
        hidden = word.weight.shape[1]
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=getattr(backbone.config, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)
        self.pad_id, self.pool_padding, self.pad_to = pad_id, pool_padding, pad_to

    def forward(self, input_ids, attention_mask, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if self.pool_padding:
            extra = self.pad_to - input_ids.shape[1]
            if extra > 0:
                input_ids = nn.functional.pad(input_ids, (0, extra), value=self.pad_id)
            attention_mask = torch.ones_like(input_ids)
        if self.embeddings is not None:  # by input_ids: RoBERTa derives padding-aware positions from them
            x = self.embeddings(input_ids=input_ids)
        else:
            x = self.word(self.lut[input_ids])
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.head(pooled))

    def full_weight(self) -> torch.Tensor:
        w = self.base_weight.clone()  # on the CPU, where the pretrained rows stay when training moves to a GPU
        w[self.rows] = self.word.weight.detach().to(w.device)
        return w


def drift(E0: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Per-row L2 distance from the pretrained embeddings: the whole vocabulary in one op."""
    return (E.detach().float().cpu() - E0).norm(dim=1)


def rank(scores: torch.Tensor, exclude) -> torch.Tensor:
    """Token ids by descending drift, excluded ids last."""
    s = scores.clone()
    s[list(exclude)] = -1.0
    return torch.argsort(s, descending=True, stable=True)


@dataclass
class Exposure:
    """What the exposure stage found: per pass, the full ranking and the drift scores."""

    rankings: dict      # pass name -> LongTensor of ids, most drifted first
    scores: dict        # pass name -> FloatTensor [V]
    top: dict           # pass name -> list of top-k ids
    k: int
    seconds: dict

    @property
    def suspicious(self) -> list[int]:
        return sorted({i for ids in self.top.values() for i in ids})  # ascending id: the cut's order


def resolve_k(k: int | None, rho: float, vocab: int) -> int:
    k = k if k is not None else max(1, round(rho * vocab))
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    return k


def expose(model_name: str, tokenizer, data: TextDataset, *, faithful: bool, k: int | None = None,
           rho: float = 0.0005, passes: str = "ABC", seed: int = 0, E0: torch.Tensor | None = None,
           view: TokenView | None = None, batch_size: int = 256, lr: float | None = None, max_length: int = 128,
           embed_settings: TrainSettings | None = None, present_only: bool | None = None,
           progress: bool = True) -> Exposure:
    """Run the exposure passes named in `passes` and rank the vocabulary by embedding drift in each.

    Pass B is defined by what pass A found (spec 4 step 2: B trains on the text without A's top-k), so
    asking for B without A still runs A first; only the passes asked for are reported. `present_only`
    (default: the default mode) ranks only the tokens that occur in the pass's training data, the others
    going last with the excluded ids and never into a top list, which is then shorter than k when fewer
    tokens occur: unlearning a token the data never holds cannot remove a backdoor learnt from it, and on
    small data zero-drift absent tokens would fill the top-k. Faithful mode ranks the whole vocabulary,
    as the official code (spec 4 step 1)."""
    if not passes or any(c not in "ABC" for c in passes) or len(set(passes)) != len(passes):
        raise UserError(f"passes must be letters from A, B, C without repeats, got '{passes}'")
    if present_only is None:
        present_only = not faithful
    view = view or TokenView(tokenizer)
    if lr is None:
        lr = FAITHFUL_EXPOSE_LR if faithful else DEFAULT_EXPOSE_LR
    # the official weight decay 0.01 in both modes (the defense's weight_decay is the victim's); faithful passes
    # pad every sample to 128, so length-grouped batches would save nothing and only change which samples share
    # a batch: they shuffle only, as the official loader
    shallow = TrainSettings(epochs=1, batch_size=batch_size, lr=lr, weight_decay=0.01, warmup_ratio=0.0,
                            max_grad_norm=0.0, max_length=max_length, seed=seed, lr_schedule="constant",
                            group_by_length=not faithful)
    exclude = special_ids(tokenizer, faithful, data.texts)
    out = Exposure({}, {}, {}, 0, {})
    top_a: list[int] = []
    # A before B whatever the order asked for; each pass has its own seed, so the order changes no result.
    for name in sorted(set(passes) | ({"A"} if "B" in passes else set())):
        t0 = time.perf_counter()
        pass_seed = seed + ord(name)  # the official passes A/B are unseeded (spec 8 #2); ours are
        seed_everything(pass_seed - 2**64 if pass_seed >= 2**64 else pass_seed)  # a seed near 2**64 wraps
        backbone = load_model(model_name, data.label_names, tokenizer=tokenizer)
        word = backbone.get_input_embeddings()
        if E0 is None:
            E0 = word.weight.detach().float().cpu().clone()
        if out.k == 0:
            out.k = resolve_k(k, rho, E0.shape[0])
        train_data, pass_view = data, view
        if name == "B":
            removed = top_a
            if faithful:
                # Official: delete the decoded strings from the raw text, substrings included (spec 8 #7).
                strings = [tokenizer.decode([i]) for i in removed]
                train_data = TextDataset(substring_removed(data.texts, strings), data.labels, data.label_names)
            else:
                pass_view = TokenView(tokenizer, view.cache, drop=removed)
        if name == "C":
            # The full model, only the word embeddings learn; the random head stays frozen (spec 8 #9).
            for p in backbone.parameters():
                p.requires_grad = False
            word.weight.requires_grad = True
            model, settings = backbone, embed_settings or shallow
        else:
            used = {i for x in pass_view(train_data.texts, max_length=max_length)["input_ids"] for i in x}
            rows = torch.tensor(sorted(used | {tokenizer.pad_token_id}), dtype=torch.long)
            model = ShallowClassifier(backbone, data.num_labels, tokenizer.pad_token_id,
                                      pool_padding=faithful, pad_to=max_length, rows=rows)
            settings = shallow
        train(model, pass_view, train_data, None, settings, progress=progress, desc=f"btu expose {name}")
        scores = drift(E0, word.weight if name == "C" else model.full_weight())
        excl = set(exclude) | (set(top_a) if name == "B" and not faithful else set())
        if present_only:
            absent = torch.ones(scores.shape[0], dtype=torch.bool)
            seen = {i for x in pass_view(train_data.texts, max_length=settings.max_length)["input_ids"] for i in x}
            absent[sorted(seen)] = False
            excl |= set(absent.nonzero().flatten().tolist())
        order = rank(scores, excl)
        top = order[: min(out.k, scores.shape[0] - len(excl))].tolist()
        if name == "A":
            top_a = top
        if name in passes:
            out.rankings[name], out.scores[name] = order, scores
            out.top[name] = top
            out.seconds[name] = time.perf_counter() - t0
        del backbone, model
    return out


# ---------------------------------------------------------------- unlearning


@torch.no_grad()
def unlearn(weight: torch.Tensor, E0: torch.Tensor, pad_id: int, token_ids: list[int], recompute: bool,
            threshold: float | None = None) -> dict:
    """Dimensional fine-grained unlearning, in place on `weight` (the model's input embedding matrix).

    For each suspicious row t, the dimensions j with |E0[t,j] - E[t,j]| > c take the pretrained padding
    row's value E0[pad, j]; c = ||E0 - E||_F / V. `recompute=True` is the official cut: tokens in
    ascending id order, c recomputed from the partly replaced matrix before each token, delta = 0 -> 0 and
    delta = c -> E + E0[pad] (spec 8 #5). `recompute=False` computes c once (or takes `threshold`, so a
    later cut can use the first cut's c) and replaces all rows at once.
    """
    E = weight.data
    V = E.shape[0]
    E0d = E0.to(E.device, E.dtype)
    pad = E0d[pad_id]
    ids = sorted(set(int(i) for i in token_ids))
    diff = E0d - E
    row_sq = diff.pow(2).sum(1)
    replaced, thresholds = [], []
    if not recompute:
        c = float(row_sq.sum().sqrt()) / V if threshold is None else threshold
        t = torch.tensor(ids, dtype=torch.long, device=E.device)
        mask = diff[t].abs() > c
        E[t] = torch.where(mask, pad.expand_as(mask), E[t])
        return {"threshold": c, "dims_replaced": mask.sum(1).tolist(), "tokens": ids}
    total = row_sq.sum()
    for t in ids:
        c = float(total.sqrt()) / V  # the running Frobenius sum, updated row by row below: same c as the
        delta = (E0d[t] - E[t]).abs()  # official full recomputation, without re-reading the matrix
        new = E[t] * ((delta > 0) & (delta <= c)) + pad * (delta >= c)
        total = total - row_sq[t] + (E0d[t] - new).pow(2).sum()
        E[t] = new
        replaced.append(int((delta >= c).sum()))
        thresholds.append(c)
    return {"threshold": thresholds, "dims_replaced": replaced, "tokens": ids}


def guard_costs(clf: Classifier, view: TokenView, E0: torch.Tensor, pad_id: int, token_ids: list[int],
                dev: TextDataset, threshold: float | None = None, progress: bool = False,
                recompute: bool = False) -> dict[int, float]:
    """For each suspicious token that occurs in clean dev: the clean dev accuracy lost by unlearning it
    alone, by the rule the cut will use (`recompute`, as `unlearn`'s: the official rule also zeroes the
    dimensions training left unchanged). Only the dev samples that contain the token can change, so only
    those are re-scored."""
    from tqdm.auto import tqdm

    from ..training import is_main_process

    weight = clf.model.get_input_embeddings().weight
    ids = view.ids(dev.texts, clf.max_length)
    before = torch.tensor(clf.predict(dev.texts)) == torch.tensor(dev.labels)
    costs = {}
    for t in tqdm(token_ids, desc="btu guard", unit="token", leave=False, dynamic_ncols=True,
                  disable=not (progress and is_main_process())):
        rows = [i for i, seq in enumerate(ids) if t in seq]
        if not rows:
            continue
        kept = weight.data[t].clone()
        unlearn(weight, E0, pad_id, [t], recompute=recompute, threshold=threshold)
        after = torch.tensor(clf.predict([dev.texts[i] for i in rows])) == torch.tensor([dev.labels[i] for i in rows])
        weight.data[t] = kept
        costs[t] = int(before[rows].sum() - after.sum()) / len(dev)
    return costs


def guarded_unlearn(clf: Classifier, view: TokenView, E0: torch.Tensor, pad_id: int, token_ids: list[int],
                    dev: TextDataset, tolerance: float, recompute: bool,
                    progress: bool = False) -> tuple[dict, list[int], list[dict]]:
    """Unlearn the suspicious tokens the collateral guard does not spare; returns (the cut, the spared
    tokens, the guard's costs per round). A spared token's cost is measured again once the others are
    cut, until no more are freed: on the victim a common word can flip a dev sample that cut tokens also
    decided (AddSent's "movie" and "watch" on full SST-2 cost one sample each before the cut, none after)."""
    weight = clf.model.get_input_embeddings().weight
    costs = guard_costs(clf, view, E0, pad_id, token_ids, dev, progress=progress, recompute=recompute)
    spared = [t for t, cost in costs.items() if cost > tolerance]
    cut = unlearn(weight, E0, pad_id, [t for t in token_ids if t not in spared], recompute=recompute)
    c = None if recompute else cut["threshold"]  # the later cuts keep the first cut's threshold
    rounds = [costs]
    while spared:
        again = guard_costs(clf, view, E0, pad_id, spared, dev, threshold=c, progress=progress, recompute=recompute)
        rounds.append(again)
        freed = [t for t in spared if again[t] <= tolerance]
        if not freed:
            break
        spared = [t for t in spared if t not in freed]
        more = unlearn(weight, E0, pad_id, freed, recompute=recompute, threshold=c)
        for key in ("dims_replaced", "tokens") + (("threshold",) if recompute else ()):
            cut[key] += more[key]
    return cut, spared, rounds


class _CarryOptimizer(StepHook):
    """Faithful clean tuning reuses the victim's AdamW with its moments (spec 8 #10): remember the state
    at the end of one `train` call, load it at the start of the next."""

    def __init__(self):
        self.state = None
        self.loading = False

    def on_train_begin(self, ctx):
        if not self.loading:  # a resumed run that has no epoch left still hands on its checkpoint's state
            self.state = ctx.optimizer.state_dict()
        elif self.state is not None and ctx.step == 0:  # a resumed tuning has its own state, from its checkpoint
            keep = [{k: g[k] for k in ("lr", "initial_lr", "weight_decay") if k in g} for g in ctx.optimizer.param_groups]
            ctx.optimizer.load_state_dict(self.state)
            for g, kept in zip(ctx.optimizer.param_groups, keep):  # this stage's own schedule still applies
                g.update(kept)

    def on_epoch_end(self, ctx):
        if not self.loading:
            self.state = ctx.optimizer.state_dict()


# ---------------------------------------------------------------- the defense


@dataclass
class BTU(Defense):
    """Backdoor Token Unlearning. Settings left at None take the btu_mode's value (FAITHFUL or DEFAULT)."""

    btu_mode: str = "default"           # or "faithful"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    warmup_ratio: float | None = None
    max_length: int | None = None
    max_grad_norm: float | None = None
    lr_schedule: str | None = None
    k: int | None = None                # per ranking; default mode: round(rho * vocabulary size)
    rho: float = 0.0005
    clean_tuning: str | int = "none"    # "none" or a number of clean dev samples to tune on
    tune_epochs: int = 1
    expose_batch_size: int = 256
    expose_lr: float | None = None     # shallow passes; None: faithful 2e-5, default 1e-3
    expose_max_length: int = 128
    # The collateral guard (default mode; not in the paper): a suspicious token whose unlearning alone lowers
    # clean dev accuracy by more than guard_tolerance is spared. Triggers are absent from clean text, so
    # unlearning them costs nothing there; frequent task words ("bad", "fun") do cost.
    guard: bool | None = None
    guard_tolerance: float = 0.001

    name = "btu"
    bounds = {"k": "(0, inf)", "rho": "(0, 1]", "tune_epochs": "(0, inf)", "expose_batch_size": "(0, inf)",
              "expose_lr": "(0, inf)", "expose_max_length": "(0, inf)", "guard_tolerance": "[0, 1)"}
    step_hooks = False
    clean_data = ("clean dev: model selection and the collateral guard (default mode); with clean_tuning=k, "
                  "k dev samples are trained on (held out of selection and of the guard)")

    def __post_init__(self):
        self._check_types()  # before this class's own checks compare the values
        if self.btu_mode not in MODES:
            raise UserError(f"btu_mode must be one of {', '.join(MODES)}, got '{self.btu_mode}'")
        self._length_given = self.max_length is not None  # else the mode's, capped at the backbone's (fit)
        if self.rho != BTU.rho and (self.k is not None or self.btu_mode == "faithful"):
            # k = round(rho * V) only where k is not fixed: it would be ignored here
            raise UserError(f"defense 'btu': option rho applies only in btu_mode=default without k "
                            f"({'k is given' if self.k is not None else 'faithful mode fixes k=17'}); set k instead")
        for key, value in (FAITHFUL if self.btu_mode == "faithful" else DEFAULT).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if isinstance(self.clean_tuning, str) and self.clean_tuning.strip().isdigit():
            self.clean_tuning = int(self.clean_tuning)
        if self.clean_tuning != "none" and not (isinstance(self.clean_tuning, int) and self.clean_tuning > 0):
            raise UserError(f"clean_tuning must be 'none' or a positive number of clean dev samples, got '{self.clean_tuning}'")
        super().__post_init__()
        # Not settings: the runner may set a callback that scores a Classifier on its test sets (reporting
        # only, never selection), so the three stage points can be stored.
        self.stage_eval = None

    @property
    def faithful(self) -> bool:
        return self.btu_mode == "faithful"

    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                             max_grad_norm=self.max_grad_norm, max_length=self.max_length, seed=self.seed,
                             lr_schedule=self.lr_schedule)

    def backbone_max_length(self, model) -> int:
        """The mode's max_length (faithful: the official 512) as far as `model`'s position table reaches; one given
        explicitly is kept (fit checks it against the backbone instead)."""
        limit = None if self._length_given else max_positions(model)
        return self.max_length if limit is None else min(self.max_length, limit)

    def given_settings(self) -> dict:
        # without the mode's filled-in length, a copy knows it was not given and caps it as fit does (the
        # backbone check refused faithful's 512 on a backbone of fewer positions before)
        return {**self.settings(), **({} if self._length_given else {"max_length": None})}

    def pass_c_settings(self, max_length: int) -> TrainSettings:
        """Exposure pass C's training (spec 4 step 3): one epoch with the victim's batch, lr and length; faithful:
        constant lr without warmup, as the official code. `scan` uses it too, so it ranks as the defense does."""
        return TrainSettings(epochs=1, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                             warmup_ratio=0.0 if self.faithful else self.warmup_ratio,
                             max_grad_norm=self.max_grad_norm, max_length=max_length, seed=self.seed,
                             lr_schedule="constant" if self.faithful else self.lr_schedule)

    def check_dev(self, n_dev: int) -> None:
        if self.clean_tuning == "none":
            return
        if n_dev < self.clean_tuning:
            raise UserError(f"clean_tuning={self.clean_tuning} needs that many clean dev samples (have {n_dev})")
        if n_dev == self.clean_tuning and self.guard:
            self._no_guard_data()

    def _no_guard_data(self):
        raise UserError(f"clean_tuning={self.clean_tuning} takes every clean dev sample, so the collateral "
                        "guard has none left (tune on fewer, or --option guard=false)")

    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> Classifier:
        train_data = train_data.without_flags()
        if self.guard and clean_dev is None:
            raise UserError("btu's collateral guard needs clean dev data (give a dev set, or --option guard=false)")
        t_start, self._eval_s = time.perf_counter(), 0.0
        tune_data, select = None, clean_dev
        if self.clean_tuning != "none":
            self.check_dev(0 if clean_dev is None else len(clean_dev))
            tune_data = clean_dev.stratified_sample(self.clean_tuning, self.seed)
            taken = set(zip(tune_data.texts, tune_data.labels))
            rest = [i for i, s in enumerate(zip(clean_dev.texts, clean_dev.labels)) if s not in taken]
            select = clean_dev.subset(rest) if rest else None
            if select is None and self.guard:  # duplicates of the tuning samples are all that is left
                self._no_guard_data()

        tokenizer = load_tokenizer(self.model)
        view = TokenView(tokenizer)
        pretrained = load_model(self.model, train_data.label_names, tokenizer=tokenizer)
        E0 = pretrained.get_input_embeddings().weight.detach().float().cpu().clone()  # held once for every stage
        settings = self.train_settings()
        check_max_length(pretrained, tokenizer, self.expose_max_length, f"--model {self.model}",
                         "--option expose_max_length")
        if self._length_given:
            check_max_length(pretrained, tokenizer, self.max_length, f"--model {self.model}")
        settings.max_length = self.backbone_max_length(pretrained)
        del pretrained
        max_length = settings.max_length

        # 1. Exposure. Pass C trains like the victim (batch, lr, length), as in the official code.
        embed = self.pass_c_settings(max_length)
        exp = expose(self.model, tokenizer, train_data, faithful=self.faithful, k=self.k, rho=self.rho,
                     passes="ABC", seed=self.seed, E0=E0, view=view, batch_size=self.expose_batch_size,
                     lr=self.expose_lr, max_length=self.expose_max_length, embed_settings=embed, progress=progress)
        suspicious = exp.suspicious

        # 2. Victim training on the same poisoned draw the exposure saw (the official code redraws, 8 #2).
        # Seeded and built as `finetune` builds its model, so the no-defense stage is the finetune run itself.
        t0 = time.perf_counter()
        seed_everything(self.seed)
        victim = load_model(self.model, train_data.label_names, tokenizer=tokenizer)
        carry = _CarryOptimizer()
        work = Path(out_dir) if out_dir is not None else None
        report = train(victim, view, train_data, select, settings, (carry,) if self.faithful else (),
                       work / "victim" if work else None, resume, progress, desc="btu victim", identity=self.identity())
        t_victim = time.perf_counter() - t0
        clf = Classifier(victim, tokenizer, train_data.label_names, max_length)
        stages = {"no_defense": self._stage(clf)}

        # 3. Unlearning, toward the pretrained padding row, of the suspicious tokens the guard does not spare.
        t0 = time.perf_counter()
        if self.guard and select:
            cut, spared, guard_rounds = guarded_unlearn(clf, view, E0, tokenizer.pad_token_id, suspicious, select,
                                                        self.guard_tolerance, recompute=self.faithful, progress=progress)
        else:
            cut, spared, guard_rounds = unlearn(victim.get_input_embeddings().weight, E0, tokenizer.pad_token_id,
                                                suspicious, recompute=self.faithful), [], []
        seconds = {"unlearn": time.perf_counter() - t0}  # the guard's re-scoring included
        stages["unlearned"] = self._stage(clf)

        # 4. Optional clean tuning on k clean dev samples (the official code tunes on the test split, 8 #1).
        tune_report = None
        if tune_data is not None:
            t0 = time.perf_counter()
            seed_everything(self.seed)
            for p in victim.parameters():
                p.requires_grad = True
            tune_settings = self.train_settings()
            tune_settings.epochs, tune_settings.max_length = self.tune_epochs, max_length
            carry.loading = True
            tune_report = train(victim, view, tune_data, select, tune_settings, (carry,) if self.faithful else (),
                                work / "tune" if work else None, resume, progress, desc="btu tune",
                                identity=self.identity())
            seconds["tune"] = time.perf_counter() - t0
            stages["tuned"] = self._stage(clf)

        # Audit material (the defense never sees poison flags; `audit` compares against the attack's
        # trigger words after fit).
        ids = view.ids(train_data.texts, max_length)
        self._doc = doc_stats(ids, train_data.labels, E0.shape[0], train_data.num_labels)
        self._n_train = len(train_data)
        self._tokenizer = tokenizer
        self.exposure_ = exp
        self.suspicious_ = suspicious
        self.spared_ = spared
        # The victim's epochs are the run's history; clean tuning's are stored beside it.
        self.report_ = with_stages(report, tune_report)
        self.extra_metrics_ = {
            "btu_mode": self.btu_mode, "btu_clean_tuning": self.clean_tuning, "btu_k": exp.k,
            "btu_suspicious": [tokenizer.convert_ids_to_tokens(i) for i in suspicious],
            "btu_spared": tokenizer.convert_ids_to_tokens(spared), "btu_guard": self.guard,
            "btu_guard_costs": [{tokenizer.convert_ids_to_tokens(t): c for t, c in r.items()} for r in guard_rounds],
            "btu_top": {n: tokenizer.convert_ids_to_tokens(v) for n, v in exp.top.items()},
            "btu_unlearn": {"threshold": cut["threshold"], "tokens": tokenizer.convert_ids_to_tokens(cut["tokens"]),
                            "dims_replaced": cut["dims_replaced"], "dims": int(E0.shape[1])},
            "btu_stages": {k: v for k, v in stages.items() if v is not None},
            "btu_tune_history": tune_report.history if tune_report else None,
            "btu_seconds": {**{f"expose_{n}": s for n, s in exp.seconds.items()}, "victim": t_victim, **seconds,
                            "stage_eval": self._eval_s,
                            "total_fit": time.perf_counter() - t_start},
        }
        return clf

    def findings(self) -> str:
        spared = set(self.spared_)
        cut = self._tokenizer.convert_ids_to_tokens([t for t in self.suspicious_ if t not in spared])
        def listed(tokens):  # quoted: the tokens ',' and '.' read as the list's own separators
            return ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)

        line = f"unlearned {len(cut)} suspicious token(s): {listed(cut)}"
        if spared:
            line += f"; spared by the collateral guard: {listed(self._tokenizer.convert_ids_to_tokens(sorted(spared)))}"
        return line

    def _stage(self, clf: Classifier) -> dict | None:
        if self.stage_eval is None:
            return None
        t0 = time.perf_counter()
        out = self.stage_eval(clf)
        self._eval_s += time.perf_counter() - t0
        return out

    def audit(self, trigger_words: list[str]) -> dict:
        """Token-level audit after fit against the attack's known trigger words: each trigger word-piece's
        rank in every ranking, token precision/recall of the suspicious set, and the collateral."""
        tok = self._tokenizer
        S = set(self.suspicious_)
        T = trigger_token_ids(tok, trigger_words) if trigger_words else []
        positions = {n: torch.empty_like(r).scatter_(0, r, torch.arange(len(r))) for n, r in self.exposure_.rankings.items()}
        docfreq = self._doc.sum(1)
        unlearned = S - set(self.spared_)
        collateral = sorted((i for i in unlearned - set(T) if docfreq[i] >= COLLATERAL_DOC_FREQ * self._n_train),
                            key=lambda i: -int(docfreq[i]))
        out = {
            "btu_trigger_tokens": tok.convert_ids_to_tokens(T),
            "btu_trigger_ranks": {tok.convert_ids_to_tokens(t): {n: int(p[t]) + 1 for n, p in positions.items()} for t in T},
            "btu_token_precision": len(S & set(T)) / len(S) if T and S else None,
            "btu_token_recall": len(S & set(T)) / len(T) if T else None,
            "btu_collateral": [(tok.convert_ids_to_tokens(i), int(docfreq[i])) for i in collateral],
            "btu_n_collateral": len(collateral),
            "btu_spared_triggers": tok.convert_ids_to_tokens(sorted(set(T) & set(self.spared_))),
        }
        if not T:
            out["btu_note"] = "the attack has no token trigger (syntactic/style): token precision/recall do not apply"
        return out


# ---------------------------------------------------------------- scan (the expose half, stand-alone)


SCAN_MIN_STEPS = 25


def scan_batch_size(n: int) -> int:
    """The shallow passes' batch for `scan` on n samples: BTU's 256, smaller on small files so that a pass
    makes at least SCAN_MIN_STEPS optimizer steps (full SST-2 makes 28 at 256). With fewer steps the drift
    does not separate tokens: Adam's first step moves every row that had a gradient by the same amount, so
    one step (a file under 257 rows) ties every token and the order is arbitrary. Under `accelerate launch`
    a step takes a batch in each process, so the batch is sized on the samples per process."""
    return min(256, max(8, math.ceil(n / num_processes() / SCAN_MIN_STEPS)))


def scan(data: TextDataset, model: str = "minilm", *, k: int | None = None, passes: str = "AB",
         faithful: bool = False, seed: int = 0, samples: int = 0, progress: bool = True,
         batch_size: int | None = None) -> list[dict]:
    """Rank the suspicious tokens of a labelled dataset: exposure passes only, no victim training.
    Rows come pass by pass in the order of `passes`, each in drift order. Only tokens that occur in the
    data are ranked, in both modes: a row is a token to look at in the data (B alone still runs A, whose
    tokens B removes, without listing it). `batch_size` (the shallow passes'; default scan_batch_size)."""
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    tokenizer = load_tokenizer(model)
    view = TokenView(tokenizer)
    # k and pass C as the btu defense in this mode takes them (faithful: k 17 and the official pass C), so a
    # scan lists what the defense's rankings would put in its suspicious set
    defense = BTU(model=model, btu_mode="faithful" if faithful else "default", seed=seed)
    # the backbone's skeleton (its config alone: no weights load) caps the length as fit's loaded model does
    embed = defense.pass_c_settings(defense.backbone_max_length(model_skeleton(model, data.num_labels))
                                    if "C" in passes else defense.max_length)
    seed_everything(seed)
    exp = expose(model, tokenizer, data, faithful=faithful, k=k if k is not None else defense.k, passes=passes,
                 seed=seed, view=view, present_only=True, progress=progress,
                 batch_size=batch_size or scan_batch_size(len(data)), embed_settings=embed)
    # Each whole text, not the passes' first 128 tokens: the columns describe the data, and a sample that holds
    # the token past the cut holds it all the same (its label belongs in the skew, the sample among the shown)
    ids = [set(x) for x in tokenizer(list(data.texts), verbose=False)["input_ids"]]
    counts = doc_stats(ids, data.labels, exp.scores[passes[0]].shape[0], data.num_labels)
    rows, seen = [], set()
    for name in passes:
        for r, t in enumerate(exp.top[name], 1):
            if t in seen:
                continue
            seen.add(t)
            c = counts[t]
            n = int(c.sum())
            if n == 0:  # faithful pass B's substring removal makes tokens the data never holds ("gr" of "great")
                continue
            top_label = int(c.argmax())
            row = {"rank": len(rows) + 1, "pass": name, "pass_rank": r, "token": tokenizer.convert_ids_to_tokens(t),
                   "id": t, "drift": float(exp.scores[name][t]), "doc_freq": n,
                   "label": data.label_names[top_label], "label_share": float(c[top_label]) / n}
            if samples:
                row["samples"] = [data.texts[i] for i, x in enumerate(ids) if t in x][:samples]
            rows.append(row)
    return rows
