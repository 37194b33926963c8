"""Builders and hooks that several test modules share."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from cleantune.models import load_tokenizer, resolve_model
from cleantune.store import ResultStore
from cleantune.training import StepHook


def tiny_causal(kind: str, path: Path) -> str:
    """A tiny randomly initialised GPT-2- or Llama-style classifier with MiniLM's tokenizer, saved at path."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tok = load_tokenizer(resolve_model("minilm"))
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                                         n_positions=64, num_labels=2, **ids))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, num_labels=2, **ids))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


class RunsCode:
    """Pickled as a call of os.system: unpickling it (pickle, or torch.load without weights_only) creates
    `marker`, so a test can tell that a loader never ran a file's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class InfGradAt(StepHook):
    def __init__(self, step):
        self.step = step

    def after_backward(self, ctx):
        if ctx.step == self.step:
            next(p for p in ctx.model.parameters() if p.grad is not None).grad.fill_(float("inf"))


class InfWeightsAt(StepHook):
    """Weights that a step with a finite gradient takes to inf (what an enormous lr does): the next gradient is NaN."""

    def __init__(self, step):
        self.step = step

    def after_backward(self, ctx):
        if ctx.step == self.step:
            with torch.no_grad():
                next(p for p in ctx.model.parameters() if p.requires_grad).fill_(float("inf"))


def write_grid(path: Path, model: str, **changes) -> Path:
    grid = {"dataset": "sst2", "attack": "badnets", "defense": ["finetune", "lora"], "seed": [0],
            "train_size": 100, "epochs": 1, "max_length": 32, "model": model, **changes}
    path.write_text(yaml.safe_dump(grid))
    return path


def sweep_table(store: ResultStore, cells) -> list[tuple]:
    """The sweep's table: what a user compares between an interrupted and an uninterrupted sweep."""
    out = []
    for c in cells:
        r = store.get(c.id)
        # with the tiny model CACC/ASR barely move, so the training losses stand in for "the same numbers"
        out.append((c.config.attack, c.config.defense, c.config.seed, r["status"],
                    round(r["metrics"]["cacc"], 4), round(r["metrics"]["asr"], 4),
                    [round(h["loss"], 5) for h in r["metrics"]["history"]]))
    return out
