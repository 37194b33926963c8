"""BKI (Chen & Dai 2021, "Mitigating backdoor attacks in LSTM-based text classification systems by
Backdoor Keyword Identification"), as OpenBackdoor's BKIDefender: train a copy of the backbone on the
(possibly poisoned) training set for `bki_epochs` (last epoch kept), then for every training sentence
measure how far the first-token representation moves (L-infinity) when each word is deleted, and keep
the sentence's `top_words` (5) most influential words. A word's score is log10(count) x mean change over
the sentences where it is among the top words. Samples whose top words contain the best-scoring keyword
are dropped, and the victim is trained on the rest.

`keywords` (default 1, as OpenBackdoor) is how many of the best-scoring words are removed; a trigger
set of several words (cleantune's BadNets draws from 5) needs more than one. `flagged_` holds, after
fit, which training samples were dropped; `keywords_` the removed words with their scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..data import TextDataset
from ..errors import UserError
from ..models import Classifier
from ..training import encode, make_batch
from .base import Defense
from .common import sentence_state, side_dir, train_side_model, with_stages


def influential_words(model, tokenizer, texts: list[str], max_length: int, top: int = 5,
                      batch_size: int = 256, progress: bool = False) -> list[list[tuple[str, float]]]:
    """Per text, its `top` words by L-inf change of the first-token final hidden state on deletion."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    out = []
    word_lists = [t.split() for t in texts]
    flat = []  # per text: the text itself, then the text without each of its words
    for w in word_lists:
        flat += [" ".join(w)] + [" ".join(w[:i] + w[i + 1:]) for i in range(len(w))]
    ids = encode(tokenizer, flat, max_length)
    order = sorted(range(len(flat)), key=lambda j: len(ids[j]))
    reps = None
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size), desc="bki scan", disable=not progress, leave=False):
            idx = order[s: s + batch_size]
            batch = make_batch([ids[j] for j in idx], tokenizer.pad_token_id)
            h = sentence_state(model, {k: v.to(device) for k, v in batch.items()})
            if reps is None:
                reps = torch.empty(len(flat), h.shape[-1])
            reps[idx] = h.float().cpu()
    j = 0
    for w in word_lists:
        orig = reps[j]
        delta = (reps[j + 1: j + 1 + len(w)] - orig).abs().amax(-1).numpy() if w else np.empty(0)
        j += 1 + len(w)
        rank = np.argsort(-delta, kind="stable")[:top]
        out.append([(w[i], float(delta[i])) for i in rank])
    return out


def keyword_scores(per_text: list[list[tuple[str, float]]]) -> list[tuple[str, float]]:
    """Words by decreasing log10(count) x mean change, over the texts where each is a top word."""
    stats: dict[str, list[float]] = {}
    for pairs in per_text:
        for word, delta in pairs:
            stats.setdefault(word, []).append(delta)
    scored = [(w, math.log10(len(d)) * float(np.mean(d))) for w, d in stats.items()]
    return sorted(scored, key=lambda x: -x[1])


@dataclass
class BKI(Defense):
    bki_epochs: int = 10
    top_words: int = 5
    keywords: int = 1

    name = "bki"
    bounds = {"bki_epochs": "(0, inf)", "top_words": "(0, inf)", "keywords": "(0, inf)"}
    clean_data = "clean dev: model selection only"

    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir=None, resume=False,
            progress=True, extra_hooks=()) -> Classifier:
        """`extra_hooks` follow the final training only, on the data BKI kept: the side model that ranks
        words is not the defended model."""
        train_data = train_data.without_flags()
        # OpenBackdoor keeps this model's last epoch: selecting it on clean dev would favour a less
        # backdoored model, whose representations reveal the trigger less
        model, tokenizer, side = train_side_model(self, train_data, self.bki_epochs, None,
                                                  side_dir(out_dir, "bki-model"), resume, progress, desc="bki model")
        per_text = influential_words(model, tokenizer, train_data.texts, self.max_length, self.top_words,
                                     progress=progress)
        del model
        self.keywords_ = keyword_scores(per_text)[: self.keywords]
        bad = {w for w, _ in self.keywords_}
        self.flagged_ = [any(w in bad for w, _ in pairs) for pairs in per_text]
        keep = [i for i, f in enumerate(self.flagged_) if not f]
        if not keep:
            raise UserError("BKI flagged every training sample; lower option keywords")
        victim = super().fit(train_data.subset(keep), clean_dev, out_dir=out_dir, resume=resume, progress=progress,
                             extra_hooks=extra_hooks)
        self.report_ = with_stages(self.report_, side)
        self.extra_metrics_ = {"bki_keywords": [[w, s] for w, s in self.keywords_], "n_removed": sum(self.flagged_)}
        return victim

    def findings(self) -> str:
        return (f"removed {sum(self.flagged_)} sample(s) holding the suspected keywords "
                f"{', '.join(w for w, _ in self.keywords_)}")
