"""Shared fixtures: a tiny randomly initialised BERT with MiniLM's tokenizer, and small real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_tiny_model(path: Path, kind: str = "bert") -> Path:
    import torch
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    from cleantune.models import resolve_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=130, num_labels=2)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, **common))
    elif kind == "distilbert":
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=130,
            num_labels=2))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(vocab_size=tok.vocab_size, pad_token_id=0, **common))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Runs, caches and the default store go to a temporary folder, never the user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
