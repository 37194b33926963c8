import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from cleantune.data import TextDataset, load_benchmark
from cleantune.defenses import FineTune, LoRA
from cleantune.errors import UserError
from cleantune.models import Classifier, load_model, load_tokenizer, resolve_model
from helpers import RunsCode, tiny_causal


@pytest.fixture(scope="module")
def named_data():
    b = load_benchmark("sst2")
    d = b.train.stratified_sample(96, 0)
    return TextDataset(d.texts, d.labels, ["neg", "pos"]), b.dev.stratified_sample(32, 0)


def test_saved_model_loads_with_transformers(tiny_model, named_data, tmp_path):
    data, dev = named_data
    clf = FineTune(model=tiny_model, epochs=1, lr=1e-3).fit(data, None, progress=False)
    before = clf.predict_logits(dev.texts)
    clf.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m.partial").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", use_safetensors=True)
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    again = Classifier.from_pretrained(tmp_path / "m")
    assert again.label_names == ["neg", "pos"]
    assert repr(again) == f"Classifier(BertForSequenceClassification, labels=['neg', 'pos'], max_length={again.max_length})"
    assert torch.allclose(again.predict_logits(dev.texts), before, atol=1e-5)
    assert torch.allclose(Classifier(hf, again.tokenizer, ["neg", "pos"]).predict_logits(dev.texts), before, atol=1e-5)
    assert again.to("cpu") is again  # as a torch module's `to`: chained, e.g. Classifier.from_pretrained(p).to("cuda")
    assert torch.allclose(again.predict_logits(dev.texts), before, atol=1e-5)


def test_lora_saves_adapter_and_merged_model(tiny_model, named_data, tmp_path):
    from peft import PeftModel

    data, dev = named_data
    clf = LoRA(model=tiny_model, epochs=1, lr=1e-2).fit(data, None, progress=False)
    before = clf.predict_logits(dev.texts)
    clf.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    card = (tmp_path / "m" / "adapter" / "README.md").read_text()  # ours, not PEFT's empty template
    assert "More Information Needed" not in card and f"base model: `{cfg['base_model_name_or_path']}`" in card
    assert "labels: `neg`, `pos` (ids 0..1)" in card
    merged = Classifier.from_pretrained(tmp_path / "m")
    assert torch.allclose(merged.predict_logits(dev.texts), before, atol=1e-5)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "m" / "adapter")
    assert torch.allclose(Classifier(with_adapter, merged.tokenizer, ["neg", "pos"]).predict_logits(dev.texts),
                          before, atol=1e-5)
    # the adapter carries the tokenizer, truncating as training did: PEFT's AutoPeftModel classes read it there
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m" / "adapter")
    assert tok.model_max_length == merged.max_length and tok("a cf film")["input_ids"] == \
        merged.tokenizer("a cf film")["input_ids"]


def test_save_refuses_what_it_must_not_replace(tiny_model, named_data, tmp_path):
    data, _ = named_data
    clf = FineTune(model=tiny_model, epochs=1, lr=1e-3).fit(data, None, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("x")
    for out, msg in ((tmp_path / "mine", "not a saved cleantune model"), (tmp_path / "file", "not a folder"),
                     (tmp_path / "file" / "m", "cannot create")):
        with pytest.raises(UserError, match=msg) as e:
            clf.save_pretrained(out)
        assert str(e.value).startswith(f"out_dir {out}: ")  # the argument's name, not the CLI's --out
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    clf.save_pretrained(tmp_path / "m")
    clf.save_pretrained(tmp_path / "m")  # a saved model is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m", "mine"]
    # but not with a file of the user's put into it, which the replaced folder took with it
    (tmp_path / "m" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=f"out_dir {tmp_path / 'm'}: the saved model there also holds notes.txt"):
        clf.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "keep me"


def test_save_refuses_the_folder_its_adapter_is_saved_against(tiny_model, named_data, tmp_path):
    """An adapter trained on a saved cleantune model and saved back into that folder names it as its base, which
    then holds the merged model: loaded on top of it, LoRA's (or MSLR's) delta acted twice. `train` refused
    --out = --model; the API saved it."""
    from cleantune.defenses import MuScleLoRA

    data, dev = named_data
    dev = TextDataset(dev.texts, dev.labels, data.label_names)
    base = FineTune(model=tiny_model, epochs=1, lr=1e-3).fit(data, None, progress=False).save_pretrained(tmp_path / "b")
    for defense in (LoRA(model=str(base), epochs=1), MuScleLoRA(model=str(base), epochs=1, ref_samples=8)):
        clf = defense.fit(data, dev, progress=False)
        before = {f: f.read_bytes() for f in base.rglob("*") if f.is_file()}
        with pytest.raises(UserError, match=f"out_dir {base}: that is the base model folder the adapter is saved "
                                            "against"):
            clf.save_pretrained(base)
        assert {f: f.read_bytes() for f in base.rglob("*") if f.is_file()} == before
        clf.save_pretrained(tmp_path / "other")  # anywhere else is fine


def test_model_names_resolve(tmp_path):
    assert resolve_model("minilm").endswith("model")
    assert resolve_model("org/some-model") == "org/some-model"  # a hub id, loaded by transformers on use
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such directory"):
        resolve_model("./missing/dir")


def test_minilm_is_the_default_backbone():
    m = load_model("minilm", ["a", "b"])
    assert m.config.hidden_size == 384 and m.config.num_hidden_layers == 6
    assert 22e6 < sum(p.numel() for p in m.parameters()) < 23e6


def test_predict_takes_one_string_as_one_text_and_no_texts(tiny_model):
    from cleantune.models import load_model, load_tokenizer

    clf = Classifier(load_model(tiny_model, ["a", "b"]), load_tokenizer(tiny_model), ["a", "b"])
    one = clf.predict("a fairly long sentence, not a list of characters")
    assert one == clf.predict(["a fairly long sentence, not a list of characters"]) and len(one) == 1
    assert clf.predict_logits("short").shape == (1, 2)
    assert clf.predict([]) == []
    assert clf.predict_logits([]).shape == (0, 2)


def test_local_model_paths_become_absolute(tiny_model, monkeypatch):
    from pathlib import Path

    from cleantune.models import model_name

    folder = Path(tiny_model).resolve()
    monkeypatch.chdir(folder.parent)
    for relative in (folder.name, f"./{folder.name}", f"../{folder.parent.name}/{folder.name}"):
        assert resolve_model(relative) == str(folder)
        assert model_name(relative) == str(folder)
    assert model_name("minilm") == "minilm" and model_name("org/some-model") == "org/some-model"


def test_saved_tokenizer_truncates_at_the_trained_length(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from cleantune.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model)
    limit = tok.model_max_length
    Classifier(load_model(tiny_model, ["a", "b"]), tok, ["a", "b"], max_length=64).save_pretrained(tmp_path / "m")
    assert AutoTokenizer.from_pretrained(tmp_path / "m").model_max_length == 64
    assert Classifier.from_pretrained(tmp_path / "m").max_length == 64
    assert tok.model_max_length == limit  # the caller's tokenizer is left as it was


def test_lora_adapter_loads_alone_by_the_readme_recipe(tiny_model, tmp_path):
    """README "Loading the LoRA adapter alone": a 3-class adapter, its head and label names restored from the
    adapter folder and the base model, predicts as the merged model does (the base has a 2-class head)."""
    from pathlib import Path

    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    texts = [f"{w} film number {i}" for i in range(30) for w in ("great", "awful", "okay")]
    data = TextDataset(texts, [i % 3 for i in range(len(texts))], ["bad", "good", "meh"])
    LoRA(model=tiny_model, epochs=1, lr=1e-2).fit(data, None, progress=False).save_pretrained(tmp_path / "model")

    # the recipe, as the README gives it
    adapter = str(tmp_path / "model" / "adapter")
    meta = json.loads((Path(adapter) / "cleantune_labels.json").read_text())
    names = meta["label_names"]
    base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(base_path)
    batch = tok(texts, truncation=True, max_length=meta["max_length"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits

    assert base_path == str(Path(tiny_model).resolve())
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        expected = merged(**batch).logits
    assert model.config.id2label == merged.config.id2label == {0: "bad", 1: "good", 2: "meh"}
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["minilmm", "minlm", "MiniLM", "minilm-"])
def test_a_mistyped_short_name_is_refused_with_a_suggestion(name):
    with pytest.raises(UserError, match=f"--model {name}: no such folder or short name; did you mean minilm\\?"):
        resolve_model(name)


@pytest.mark.parametrize("name", ["bert-base-uncased", "gpt2", "roberta-base", "distilgpt2", "xlnet-base-cased"])
def test_legacy_hub_ids_without_a_slash_pass(name):
    assert resolve_model(name) == name


class _NoNetwork:
    """An HTTP client whose every request fails as a machine without a network does."""

    def __init__(self):
        self.requests = 0

    def _fail(self, method, url, **kwargs):
        try:  # the pinned huggingface_hub's HTTP library; 1.x (a GPU machine's own stack) uses httpx
            import httpx2 as httpx
        except ImportError:
            import httpx

        self.requests += 1
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    request = stream = _fail


def test_an_unreachable_hub_fails_once_quietly(monkeypatch, capsys, caplog, tmp_path):
    """Without a network (and without HF_HUB_OFFLINE), a hub id not in the cache fails in one line after one
    request, instead of huggingface_hub's 5 retries per file with backoff and a warning for each."""
    import time
    import types

    import huggingface_hub
    from huggingface_hub.utils import _http

    from cleantune import models
    from cleantune.cli import main

    client, sleeps = _NoNetwork(), []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_http, "get_session", lambda: client)
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**{k: getattr(time, k) for k in dir(time)
                                                                   if not k.startswith("_")}, "sleep": sleeps.append}))
    for load in (lambda: models.load_tokenizer("no-org/unreachable-model"),
                 lambda: models.load_model("no-org/unreachable-model", ["a", "b"])):
        with pytest.raises(UserError, match="--model no-org/unreachable-model: cannot load.*not in the local Hugging "
                                            "Face cache and the hub cannot be reached .*Name or service not known"):
            load()
    assert client.requests == 1 and sleeps == []  # one probe, remembered; no retries
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    assert main(["train", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "m"), "--model", "other/unreachable"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    # train checks the settings against the backbone first: its config is what fails to load
    assert "--model other/unreachable: cannot load: not in the local Hugging Face cache" in err, err
    assert client.requests == 2 and sleeps == [] and not (tmp_path / "m").exists()


def test_a_pickle_checkpoint_is_refused(tiny_model, tmp_path):
    """Weights load from safetensors only: a pytorch_model.bin (a pickle, which can run code) is never read."""
    import shutil

    from safetensors.torch import load_file

    from cleantune.models import load_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    weights = load_file(folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="cannot load"):
        load_model(str(folder), ["a", "b"])
    # the same pickle with a tensor that runs a command when unpickled: refused before it is read
    torch.save({**weights, "bert.pooler.dense.bias": RunsCode(tmp_path / "ran")}, folder / "pytorch_model.bin")
    for load in (lambda: load_model(str(folder), ["a", "b"]), lambda: Classifier.from_pretrained(folder)):
        with pytest.raises(UserError, match="cannot load"):
            load()
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_that_ships_code_is_refused_without_running_it(tiny_model, tmp_path, monkeypatch, capsys):
    """A config.json whose auto_map points at the folder's own .py files: transformers would ask on a terminal
    and run the code on "y". Loading refuses in one line, whatever stdin says, and the code never runs."""
    import io
    import shutil

    from cleantune.cli import main
    from cleantune.models import load_tokenizer

    folder = tmp_path / "remote"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / "ran"
    code = (f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import BertConfig\n"
            "class MyCfg(BertConfig):\n    model_type = 'mything'\n")
    (folder / "cfg.py").write_text(code)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="mything", auto_map={"AutoConfig": "cfg.MyCfg",
                                               "AutoModelForSequenceClassification": "cfg.MyCfg"})
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    for load in (lambda: load_model(str(folder), ["a", "b"]), lambda: Classifier.from_pretrained(folder)):
        with pytest.raises(UserError, match="custom code"):
            load()
    load_tokenizer(str(folder))  # the tokenizer files name a built-in class: nothing to run
    (tmp_path / "d.tsv").write_text("text\tlabel\ngood\t1\nbad\t0\n")
    assert main(["eval", str(folder), str(tmp_path / "d.tsv")]) == 2
    assert capsys.readouterr().err.startswith(f"cleantune: error: {folder}: cannot read its config.json (The "
                                              f"repository {folder} contains custom code which must be executed")
    assert not marker.exists()


def test_a_folder_without_tokenizer_files_is_refused(tiny_model, tmp_path, capsys):
    """transformers builds a 5-token tokenizer from config.json alone: every word would be [UNK], and training
    and eval would run on nothing. A file given as the model is named as such."""
    import shutil

    from cleantune.cli import main
    from cleantune.models import load_tokenizer

    folder = tmp_path / "notok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / name, folder / name)
    with pytest.raises(UserError, match="cannot load its tokenizer .the folder has no tokenizer.json"):
        load_tokenizer(str(folder))
    (tmp_path / "d.tsv").write_text("text\tlabel\ngood\t1\nbad\t0\n")
    assert main(["eval", str(folder), str(tmp_path / "d.tsv")]) == 2
    assert capsys.readouterr().err == (f"cleantune: error: {folder}: cannot load its tokenizer (the folder has no "
                                       "tokenizer.json, tokenizer_config.json, vocab or sentencepiece file)\n")
    with pytest.raises(UserError, match="a file, not a model folder"):
        resolve_model(str(tmp_path / "d.tsv"))
    # the settings file without the vocabulary (a copy that left tokenizer.json and vocab.txt behind)
    shutil.copy(Path(tiny_model) / "tokenizer_config.json", folder / "tokenizer_config.json")
    with pytest.raises(UserError, match="holds only its 5 special tokens .the vocabulary file"):
        load_tokenizer(str(folder))
    assert main(["eval", str(folder), str(tmp_path / "d.tsv")]) == 2
    assert capsys.readouterr().err == (f"cleantune: error: {folder}: its tokenizer holds only its 5 special tokens "
                                       "(the vocabulary file, tokenizer.json or vocab.*, is missing from the folder)\n")
    # a character-level tokenizer (CANINE, ByT5) saves its settings alone: no vocabulary to miss
    from transformers import CanineConfig, CanineTokenizer

    chars = tmp_path / "canine"
    CanineTokenizer().save_pretrained(chars)
    CanineConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(chars)
    assert load_tokenizer(str(chars))("ab")["input_ids"][1:3] == [ord("a"), ord("b")]


def test_causal_lm_without_a_pad_token_pads_with_eos(tmp_path):
    """GPT-2 and Llama ship no pad token: without one, HF's classifier refuses any batch of two or more."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from cleantune.models import load_model, load_tokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    tok.pad_token, tok.eos_token = None, "[SEP]"
    tok.save_pretrained(tmp_path / "g")
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                             eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                                             pad_token_id=None)).save_pretrained(tmp_path / "g")
    clf = Classifier(load_model(str(tmp_path / "g"), ["a", "b"]), load_tokenizer(str(tmp_path / "g")), ["a", "b"])
    assert clf.model.config.pad_token_id == clf.tokenizer.pad_token_id == tok.sep_token_id
    texts = ["a fine film", "a dull , long and loud movie"]
    # HF pools each row at its last non-pad token, so a padded text scores as it does alone
    assert torch.allclose(clf.predict_logits(texts), torch.cat([clf.predict_logits(t) for t in texts]), atol=1e-5)


def test_a_causal_lm_pools_where_its_tokenizer_pads(tmp_path, monkeypatch):
    """A config without a pad id beside a tokenizer with its own pad token ([PAD], id 0): the model took EOS as its
    pad id, so HF's classifier read each padded row at a pad position and a text scored differently in a batch."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from cleantune.models import load_model, load_tokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    tok.eos_token = "[SEP]"
    tok.save_pretrained(tmp_path / "g")
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                             eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                                             pad_token_id=None)).save_pretrained(tmp_path / "g")
    clf = Classifier(load_model(str(tmp_path / "g"), ["a", "b"]), load_tokenizer(str(tmp_path / "g")), ["a", "b"], 32)
    assert clf.model.config.pad_token_id == clf.tokenizer.pad_token_id == tok.pad_token_id != tok.sep_token_id
    texts = ["a fine film", "a dull , long and loud movie"]
    # GPT-2 adds token-type embeddings, which MiniLM's tokenizer would hand it: none, as for a GPT-2 tokenizer
    alone = torch.cat([clf.predict_logits(t) for t in texts])
    assert torch.allclose(clf.predict_logits(texts), alone, atol=1e-5)
    clf.save_pretrained(tmp_path / "saved")
    assert Classifier.from_pretrained(tmp_path / "saved").model.config.pad_token_id == tok.pad_token_id
    # a caller that holds the tokenizer already (every defense does) hands it over: the pad id is its own, and
    # the folder's tokenizer is not loaded a second time
    import cleantune.models as models

    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded again"))
    given = AutoTokenizer.from_pretrained(tmp_path / "g")
    given.pad_token = "[MASK]"
    assert models.load_model(str(tmp_path / "g"), ["a", "b"], tokenizer=given).config.pad_token_id == tok.mask_token_id


def test_max_length_is_checked_against_the_position_table_and_the_special_tokens(tiny_model):
    """RoBERTa-style positions start after the padding index: roberta-base's 514 rows take 512 tokens. At
    the tokenizer's special-token count or below, a fast tokenizer would not truncate at all."""
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    from cleantune.models import check_max_length

    tok = load_tokenizer(tiny_model)  # [CLS] text [SEP]
    assert len(tok(["a long text of many words"], truncation=True, max_length=2)["input_ids"][0]) == 2
    small = dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    for model in (BertForSequenceClassification(BertConfig(max_position_embeddings=64, **small)),
                  RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=66, pad_token_id=1, **small))):
        check_max_length(model, tok, 64, "--model m")
        check_max_length(model, tok, 3, "--model m")
        with pytest.raises(UserError, match="--max-length 65 exceeds the 64 tokens --model m takes"):
            check_max_length(model, tok, 65, "--model m")
        for n in (1, 2):
            with pytest.raises(UserError, match=rf"--max-length {n} leaves no token for the text: --model m adds 2 "
                                                r"special tokens to each sample \(give at least 3\)"):
                check_max_length(model, tok, n, "--model m")


def test_predict_keeps_the_input_order_and_the_train_mode(tiny_model):
    from cleantune.models import load_model, load_tokenizer

    clf = Classifier(load_model(tiny_model, ["a", "b"]), load_tokenizer(tiny_model), ["a", "b"])
    # longest first: batching sorts by length, and the rows must come back in the caller's order
    texts = ["a much longer text with a good many more words in it", "short", "a medium length text", "hi"]
    clf.model.train()
    alone = torch.cat([clf.predict_logits(t) for t in texts])
    assert torch.allclose(clf.predict_logits(texts, batch_size=2), alone, atol=1e-5)
    assert clf.model.training  # predicting in the middle of training leaves dropout on


@pytest.mark.parametrize("given,wanted", [("query", {"query"}), ("query, value", {"query", "value"}),
                                          (r".*\.value", {"value"}), (["query"], {"query"})])
def test_lora_target_modules_as_names_or_regex(tiny_model, given, wanted):
    # `--option target_modules=query` arrives as a string, which PEFT alone would read as a regex that matches
    # no whole module name
    from cleantune.defenses.lora import apply_lora
    from cleantune.models import load_model

    model = apply_lora(load_model(tiny_model, ["a", "b"]), 2, 4, 0.0, given)
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if ".lora_A." in n} == wanted
    with pytest.raises(UserError, match="option target_modules=\\['nope'\\]: No modules were targeted"):
        apply_lora(load_model(tiny_model, ["a", "b"]), 2, 4, 0.0, "nope")


def test_lora_options_reach_peft(tiny_model):
    from cleantune.defenses import LoRA
    from cleantune.models import load_model

    d = LoRA(model=tiny_model, lora_r=2, lora_alpha=6, lora_dropout=0.3, target_modules="query")
    cfg = d.prepare_model(load_model(tiny_model, ["a", "b"]), None, None).peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, set(cfg.target_modules)) == (2, 6, 0.3, {"query"})


def test_lora_train_head_decides_whether_the_classification_head_trains(tiny_model):
    # train_head=False is the MuScleLoRA paper's LoRA baseline (head frozen at its random init); the default
    # trains it. Only the head's trainability differs: the LoRA matrices train either way
    from cleantune.defenses import LoRA
    from cleantune.models import load_model

    for train_head in (True, False):
        model = LoRA(model=tiny_model, train_head=train_head).prepare_model(load_model(tiny_model, ["a", "b"]), None,
                                                                            None)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        head = {n for n in trainable if ".classifier." in n}
        assert bool(head) == train_head, (train_head, head)
        assert trainable - head and all(".lora_" in n for n in trainable - head)


def test_lora_adds_no_deprecation_notice_of_peft_internals(tiny_model):
    import warnings

    from cleantune.defenses.lora import apply_lora

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # as a sweep worker, which has none of the CLI's filters
        apply_lora(load_model(tiny_model, ["neg", "pos"]), r=2, alpha=4)
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_a_kill_while_replacing_a_saved_model_keeps_the_earlier_one(tiny_model, named_data, tmp_path, monkeypatch):
    import os

    from cleantune import models

    data, dev = named_data
    clf = FineTune(model=tiny_model, epochs=1, lr=1e-3).fit(data, None, progress=False)
    clf.save_pretrained(tmp_path / "m")
    real = os.replace

    class Killed(BaseException):
        pass

    def killed_before_the_new_one_is_in_place(src, dst):
        if str(src).endswith("m.partial"):
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(models.os, "replace", killed_before_the_new_one_is_in_place)
    with pytest.raises(Killed):
        clf.save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    earlier = Classifier.from_pretrained(tmp_path / "m.old")  # whole, beside the finished new one
    assert torch.allclose(earlier.predict_logits(dev.texts), clf.predict_logits(dev.texts), atol=1e-5)
    assert (tmp_path / "m.partial" / "model.safetensors").is_file()
    clf.save_pretrained(tmp_path / "m")  # the next save clears both
    assert not (tmp_path / "m.old").exists() and not (tmp_path / "m.partial").exists()


def test_a_half_precision_checkpoint_loads_in_float32(tiny_model, tmp_path):
    """transformers 5 keeps a checkpoint's dtype; AdamW on bf16 weights would round most updates away."""
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(tiny_model) / f).is_file():
            (tmp_path / "bf16" / f).write_bytes((Path(tiny_model) / f).read_bytes())
    model = load_model(str(tmp_path / "bf16"), ["neg", "pos"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_label_mapping_goes_both_ways_and_is_saved(tiny_model, tmp_path):
    from cleantune.models import load_tokenizer

    names = ["neg", "pos", "mixed"]
    model = load_model(tiny_model, names)
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "mixed": 2}
    Classifier(model, load_tokenizer(tiny_model), names).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["label2id"] == {"neg": 0, "pos": 1, "mixed": 2}
    assert {int(k): v for k, v in cfg["id2label"].items()} == {0: "neg", 1: "pos", 2: "mixed"}


def test_predict_truncates_at_the_classifiers_max_length(tiny_model):
    from cleantune.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["a", "b"]).eval()
    with torch.no_grad():
        model.classifier.weight *= 200  # a random tiny model is near-uniform: make its logits differ by input
    text = "a film that goes on and on " * 8
    with torch.no_grad():
        cut = model(**tok(text, truncation=True, max_length=8, return_tensors="pt")).logits
        whole = model(**tok(text, return_tensors="pt")).logits
    assert not torch.allclose(cut, whole, atol=1e-4)  # truncation changes this text's logits
    assert torch.allclose(Classifier(model, tok, ["a", "b"], max_length=8).predict_logits(text), cut, atol=1e-5)
    assert torch.allclose(Classifier(model, tok, ["a", "b"], max_length=128).predict_logits(text), whole, atol=1e-5)


def test_a_folder_without_a_label_file_takes_its_configs_label_names(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    names = {0: "x", 1: "y", 2: "z"}
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label=names, label2id={v: k for k, v in names.items()},
        ignore_mismatched_sizes=True).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "hf")
    clf = Classifier.from_pretrained(tmp_path / "hf")
    assert clf.label_names == ["x", "y", "z"] and clf.max_length == 128
    assert clf.model.config.id2label == names


def test_a_folder_without_a_label_file_truncates_within_its_position_table_and_tokenizer(tmp_path):
    """The 128 tokens assumed for a model from elsewhere ran past a 64-position table: eval crashed on a long text."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2)).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    clf = Classifier.from_pretrained(tmp_path / "hf")
    assert clf.max_length == 64 and clf.predict("a film that goes on and on " * 20) in ([0], [1])
    tok.model_max_length = 32  # the length it was trained at, as cleantune saves its own tokenizers
    tok.save_pretrained(tmp_path / "hf")
    assert Classifier.from_pretrained(tmp_path / "hf").max_length == 32


# ---------------------------------------------------------------- defenses.common and defenses.base


def test_sentence_states_are_the_last_layers_first_or_last_real_token(tiny_model, tmp_path):
    """An encoder's [CLS] state and a causal LM's last real token's, each row the caller's text's, computed
    here on each text alone (no padding) from the backbone's last hidden layer."""

    from cleantune.defenses.common import sentence_states
    from cleantune.models import load_tokenizer

    texts = ["a much longer text with a good many words in it", "short", "a medium length text"]  # longest first
    for path, last in ((tiny_model, False), (tiny_causal("gpt2", tmp_path / "gpt2"), True)):
        tok = load_tokenizer(path)
        model = load_model(path, ["a", "b"])
        model.train()
        got = sentence_states(model, tok, texts, 32, batch_size=2)
        assert model.training  # the caller's mode is restored
        model.eval()
        for text, row in zip(texts, got):
            enc = tok(text, return_tensors="pt")  # without token_type_ids, which GPT-2 would embed
            with torch.no_grad():
                h = model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
            assert torch.allclose(row, h[-1] if last else h[0], atol=1e-5), (path, text)


def test_per_sample_losses_are_the_cross_entropy_at_the_given_max_length(tiny_model):
    from cleantune.defenses.common import per_sample_losses
    from cleantune.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["a", "b"])
    with torch.no_grad():
        model.classifier.weight *= 50  # losses far from log 2, so a wrong label or input shows
    data = TextDataset(["a film that goes on and on " * 6, "dull", "a fine cast and a fine plot"], [0, 1, 1], ["a", "b"])
    losses = per_sample_losses(model, tok, data, 6)
    model.eval()
    for text, y, loss in zip(data.texts, data.labels, losses):
        with torch.no_grad():
            logits = model(**tok(text, truncation=True, max_length=6, return_tensors="pt")).logits[0]
        assert loss == pytest.approx(float(-torch.log_softmax(logits, -1)[y]), rel=1e-4, abs=1e-6)


def test_a_side_model_trains_with_its_own_epochs_and_lr(tiny_model, monkeypatch):
    import cleantune.defenses.common as common
    from cleantune.defenses import get_defense

    seen = []
    monkeypatch.setattr(common, "train", lambda model, tok, data, dev, settings, *a, **k: seen.append(settings) or "r")
    d = get_defense("finetune", model=tiny_model, epochs=3, lr=1e-3, max_length=32, seed=4)
    data = TextDataset(["good", "bad"], [1, 0], ["a", "b"])
    assert common.train_side_model(d, data, 7, None, None, False, False, "side", lr=5e-4)[2] == "r"
    common.train_side_model(d, data, 2, None, None, False, False, "side")
    assert [(s.epochs, s.lr, s.max_length, s.seed) for s in seen] == [(7, 5e-4, 32, 4), (2, 1e-3, 32, 4)]


def test_fit_hides_the_poison_flags_and_runs_analysis_hooks_after_the_defenses(tiny_model, monkeypatch):
    import cleantune.defenses.base as base
    from cleantune.training import StepHook

    own, extra, seen = StepHook(), StepHook(), {}

    class Probe(base.Defense):
        name = "probe"

        def prepare_model(self, model, tokenizer, train_data):
            seen["prepare"] = list(train_data.poisoned)
            return model

        def hooks(self, model, tokenizer, train_data, clean_dev):
            seen["hooks"] = list(train_data.poisoned)
            return (own,)

    monkeypatch.setattr(base, "train", lambda model, tok, data, dev, settings, hooks, *a, **k:
                        seen.update(train=list(data.poisoned), order=hooks))
    data = TextDataset(["good", "bad", "cf fine"], [1, 0, 1], ["a", "b"], [False, False, True])
    Probe(model=tiny_model, epochs=1).fit(data, None, progress=False, extra_hooks=(extra,))
    assert seen["prepare"] == seen["hooks"] == seen["train"] == [False] * 3
    assert seen["order"] == (own, extra)


def test_loading_leaves_the_callers_transformers_settings_as_they_were(tiny_model):
    """A library call must not change transformers' global logging or progress bars for the rest of the caller's
    session (the CLI silences them for its own process)."""
    from transformers.utils import logging

    logging.set_verbosity_info()
    logging.enable_progress_bar()
    try:
        load_model(tiny_model, ["a", "b"])
        load_tokenizer(tiny_model)
        assert logging.get_verbosity() == logging.INFO and logging.is_progress_bar_enabled()
    finally:
        logging.set_verbosity_warning()


def test_fit_matches_the_dev_sets_classes_to_the_training_datas_by_name(tiny_model, monkeypatch):
    """A clean dev set built apart from the training data (a benchmark in its own order, a file of names read in
    sorted order) numbers the same classes otherwise: read in the training data's ids, the epoch would be selected
    on swapped classes. Every defense's fit renumbers it by name, as `evaluate` does, or refuses other classes."""
    import cleantune.defenses.base as base

    seen = []
    monkeypatch.setattr(base, "train", lambda model, tok, data, dev, *a, **k: seen.append(dev))

    class OwnFit(base.Defense):  # a defense with its own fit (BTU, BKI, STRIP, ...)
        name = "own-fit"

        def fit(self, train_data, clean_dev=None, **kwargs):
            seen.append(clean_dev)

    data = TextDataset(["good", "bad"], [1, 0], ["negative", "positive"])
    dev = TextDataset(["fine", "awful", "great"], [0, 1, 0], ["positive", "negative"])
    FineTune(model=tiny_model, epochs=1).fit(data, dev, progress=False)
    OwnFit(model=tiny_model).fit(data, clean_dev=dev)
    for got in seen:
        assert (got.texts, got.labels, got.label_names) == (dev.texts, [1, 0, 1], ["negative", "positive"])
    with pytest.raises(UserError, match=r"labels of clean_dev \(neg, pos\)"):
        FineTune(model=tiny_model, epochs=1).fit(data, TextDataset(["a"], [0], ["neg", "pos"]), progress=False)
    with pytest.raises(UserError, match="clean_dev has 3 classes"):
        OwnFit(model=tiny_model).fit(TextDataset(["a", "b"], [0, 1], ["0", "1"]), TextDataset(["c"], [2], ["0", "1", "2"]))
    assert len(seen) == 2  # refused before anything trains


def test_a_model_saved_under_the_home_folder_loads_back_from_there(tiny_model, tmp_path, monkeypatch):
    """from_pretrained reads "~/m" as the home folder's m: save_pretrained must write it there, not into a folder
    named "~" in the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    clf = Classifier.from_pretrained(tiny_model)
    clf.save_pretrained("~/m")
    assert (tmp_path / "home" / "m" / "model.safetensors").is_file() and not (tmp_path / "~").exists()
    assert Classifier.from_pretrained("~/m").label_names == clf.label_names


def test_fit_refuses_training_data_of_one_class(tiny_model):
    """Its model would save, but Classifier.from_pretrained refuses a label file of fewer than two names."""
    with pytest.raises(UserError, match="names 1 class.*at least two"):
        FineTune(model=tiny_model, epochs=1).fit(TextDataset(["good", "fine"], [0, 0], ["pos"]), progress=False)


@pytest.mark.parametrize("name", ["finetune", "btu"])
def test_fit_refuses_an_empty_clean_dev_set(tiny_model, name):
    """An empty dev set trained as if none were given: no model selection, and BTU's collateral guard, which
    refuses to run without dev data, was skipped without a word."""
    from cleantune.defenses import get_defense

    train = TextDataset(["good film", "bad film"], [1, 0], ["neg", "pos"])
    with pytest.raises(UserError, match="clean_dev holds no sample"):
        get_defense(name, model=tiny_model, epochs=1).fit(train, TextDataset([], [], ["neg", "pos"]), progress=False)


def test_saving_prints_nothing_and_prediction_refuses_an_empty_batch(tiny_model, tmp_path, capfd):
    """transformers' "Writing model shards" bar came with every save_pretrained (loading was already quiet), and
    predict(..., batch_size=0) failed in range()."""
    from transformers.utils import logging

    clf = Classifier.from_pretrained(tiny_model)
    capfd.readouterr()
    clf.save_pretrained(tmp_path / "m")
    out, err = capfd.readouterr()
    assert out == "" and err == "" and logging.is_progress_bar_enabled()  # the caller's settings come back
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="batch_size must be a whole number of at least 1"):
            clf.predict(["a film"], batch_size=bad)


def test_a_defense_built_directly_checks_and_converts_its_values_like_the_cli():
    """Built in Python (not through get_defense), `epochs="2"` failed comparing str and int, and epochs=2.5,
    seed=True or lr=None passed, to fail in training or to train with them."""
    from cleantune.defenses import BTU, RAP, get_defense

    assert FineTune(epochs="2", lr="1e-4").epochs == 2
    for kw, msg in [({"epochs": 2.5}, "'epochs' expects an integer, got 2.5"),
                    ({"seed": True}, "'seed' expects an integer, got True"),
                    ({"lr": None}, "'lr' expects a number, got None"),
                    ({"model": None}, "'model' expects a string, got None")]:
        with pytest.raises(UserError, match=f"defense 'finetune': {msg}"):
            FineTune(**kw)
    with pytest.raises(UserError, match="defense 'btu': 'seed' expects an integer, got 1.5"):
        BTU(seed=1.5)
    with pytest.raises(UserError, match="defense 'rap': 'word' expects a string, got 5"):  # was: 'int' has no strip
        RAP(word=5)
    from cleantune.attacks import get_attack

    for get in (get_defense, get_attack):  # a list is unhashable: a TypeError of the registry's dict
        with pytest.raises(UserError, match=r"unknown (defense|attack) '\['"):
            get(["lora"])


def test_fit_refuses_what_is_not_a_dataset_an_empty_text_and_a_file_as_out_dir(tiny_model, tmp_path):
    """A benchmark or a list failed with an AttributeError, an empty text trained as the special tokens alone, and
    a file as out_dir failed with NotADirectoryError after the first epoch."""
    data = TextDataset(["good film", "bad film"], [1, 0], ["neg", "pos"])
    fit = FineTune(model=tiny_model, epochs=1).fit
    bench = load_benchmark("sst2")
    with pytest.raises(UserError, match=r"train_data must be a TextDataset .*got Benchmark \(pass its splits"):
        fit(bench, progress=False)
    with pytest.raises(UserError, match="clean_dev must be a TextDataset .*got list"):
        fit(data, ["good"], progress=False)
    for text, msg in (("  ", "empty text"), ("\u200b\u2060", r"empty text \(only invisible characters\)"),
                      ("bad \ud800 film", r"invalid text \(character 5 is a lone surrogate\)")):  # as read_dataset's
        with pytest.raises(UserError, match=f"sample 1 of train_data has {msg}"):  # the last: a tokenizer TypeError
            fit(TextDataset(["good film", text], [1, 0], ["neg", "pos"]), progress=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="out_dir .*f: exists and is not a folder"):
        fit(data, out_dir=tmp_path / "f", progress=False)


def test_predict_refuses_an_empty_text_and_what_is_no_text(tiny_model):
    """An empty text got a class from the special tokens alone; a number failed in len() or in the tokenizer."""
    clf = Classifier(load_model(tiny_model, ["a", "b"]), load_tokenizer(tiny_model), ["a", "b"])
    for texts, msg in (("", "empty text"), (["fine", " "], "empty text"), (["\u200b"], "empty text"),
                       (["fine", "so \ud800"], "invalid text")):  # the last two: a class, and a tokenizer TypeError
        with pytest.raises(UserError, match=f"predict: text [01] has {msg}"):
            clf.predict(texts)
    for texts, msg in ((5, "got int"), (None, "got NoneType"), (["fine", 5], "item 1 is 5")):
        with pytest.raises(TypeError, match=f"texts must be a string or a list of strings.*{msg}"):
            clf.predict(texts)


def test_a_model_that_cannot_be_written_is_a_one_line_error_and_the_earlier_one_stays(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """A full disk while saving: an OSError traceback before. The earlier model in the folder is untouched and no
    `.partial` is left."""
    import errno

    from cleantune import training

    clf = Classifier(load_model(tiny_model, ["a", "b"]), load_tokenizer(tiny_model), ["a", "b"])
    out = clf.save_pretrained(tmp_path / "m")
    before = sorted(p.name for p in out.iterdir())

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(training, "_fsync", full)
    with pytest.raises(UserError, match="out_dir .*m: cannot write the model \\(No space left on device\\)"):
        clf.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == before
    assert Classifier.from_pretrained(out).label_names == ["a", "b"]


def test_a_file_size_limit_while_saving_or_checkpointing_is_a_one_line_error(tiny_model, tmp_path):
    """A real failed write (here a 2 MB file-size limit; a full disk alike): safetensors raises a SafetensorError
    and torch.save a RuntimeError, not OSError, so both went past the one-line handling as tracebacks."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.RLIM_INFINITY))

    save = ("import sys\nfrom cleantune.errors import UserError\n"
            "from cleantune.models import Classifier, load_model, load_tokenizer\n"
            f"clf = Classifier(load_model({tiny_model!r}, ['a', 'b']), load_tokenizer({tiny_model!r}), ['a', 'b'])\n"
            "try:\n    clf.save_pretrained(sys.argv[1])\nexcept UserError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", save, str(tmp_path / "m")], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    assert done.returncode == 0 and done.stdout == f"out_dir {tmp_path / 'm'}: cannot write the model (File too large)\n", \
        done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no model, no .partial
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"w{i} film\t{i % 2}\n" for i in range(16)))
    done = subprocess.run([sys.executable, "-m", "cleantune", "train", str(tmp_path / "d.tsv"), "--model", tiny_model,
                           "--epochs", "1", "--no-progress", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"cleantune: error: cannot write epoch 0's checkpoint in {tmp_path / 'm.work'} (File too large); free space, "
        "then run the command again"]  # no earlier checkpoint to resume from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tsv"]  # nor an empty m.work or a partial checkpoint


# ---------------------------------------------------------------- mutation-testing gaps


def test_predict_gives_each_texts_highest_scoring_class(tiny_model):
    # predict is what a user calls for labels: it must be the argmax of the model's own logits, row by row, in
    # the caller's order (nothing else compared predict with the logits: predict vs predict agreed on any rule)
    names = ["neg", "pos", "mixed"]
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, names).eval()
    texts = ["a fine film", "dull", "a long and loud movie with a weak plot", "great cast", "so-so", "awful"]
    with torch.no_grad():  # a random tiny model scores every text alike: aim each class at one text's features
        pooled = model.bert(**tok(texts[:3], padding=True, return_tensors="pt")).pooler_output
        weight = (pooled - pooled.mean(0)) * 1e4  # logits (p - mean) . weight: the features' shared part cancels
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ pooled.mean(0))
    expected = []
    for text in texts:
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0]
        expected.append(max(range(len(names)), key=lambda c: float(logits[c])))
    assert len(set(expected)) > 1  # else any constant rule would pass
    assert Classifier(model, tok, names).predict(texts, batch_size=4) == expected


def _lora_with_nonzero_delta(tiny_model):
    from cleantune.defenses.lora import apply_lora

    model = apply_lora(load_model(tiny_model, ["neg", "pos"]), r=2, alpha=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # lora_B starts at zero: merging would change nothing
    return model


def test_saving_a_lora_classifier_leaves_its_adapters_unmerged_and_saves_twice_alike(tiny_model, tmp_path):
    # save_pretrained merges a copy: the caller's model keeps its LoRA layers (training or saving again goes on
    # with the adapter), and a second save writes the same merged weights as the first
    from safetensors.torch import load_file

    clf = Classifier(_lora_with_nonzero_delta(tiny_model), load_tokenizer(tiny_model), ["neg", "pos"], 32)
    lora_before = {n: p.detach().clone() for n, p in clf.model.named_parameters() if "lora_" in n}
    texts = ["a fine film", "a dull , long and loud movie"]
    logits = clf.predict_logits(texts)
    clf.save_pretrained(tmp_path / "a")
    lora_after = {n: p.detach() for n, p in clf.model.named_parameters() if "lora_" in n}
    assert lora_after.keys() == lora_before.keys() and lora_before
    assert all(torch.equal(lora_after[n], lora_before[n]) for n in lora_before)
    assert torch.allclose(clf.predict_logits(texts), logits, atol=1e-6)
    clf.save_pretrained(tmp_path / "b")
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.allclose(Classifier.from_pretrained(tmp_path / "b").predict_logits(texts), logits, atol=1e-5)


def test_a_label_file_without_max_length_loads_at_128_tokens(tiny_model, tmp_path):
    # label files may name the classes alone (written by hand, or by an earlier cleantune): the length is then
    # cleantune's default of 128, which the tiny model's 130 positions take
    import shutil

    m = shutil.copytree(tiny_model, tmp_path / "m")
    (m / "cleantune_labels.json").write_text(json.dumps({"label_names": ["neg", "pos"]}))
    clf = Classifier.from_pretrained(m)
    assert clf.label_names == ["neg", "pos"] and clf.max_length == 128


def test_a_label_file_of_one_class_is_refused_even_for_a_one_output_model(tiny_model, tmp_path):
    # a one-output head is a regressor in transformers: with one label name it would "classify" every text as
    # that class. The label file must name two or more classes whatever the config says
    m = tmp_path / "one"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1,
                                                       ignore_mismatched_sizes=True).save_pretrained(m)
    load_tokenizer(tiny_model).save_pretrained(m)
    (m / "cleantune_labels.json").write_text(json.dumps({"label_names": ["only"], "max_length": 32}))
    with pytest.raises(UserError, match="not a list of two or more names"):
        Classifier.from_pretrained(m)


def test_lora_takes_a_regex_that_starts_with_a_word_as_a_regex(tiny_model):
    # only a plain comma list of names is split into names; any other string is PEFT's regex over whole module
    # names, even one that starts with a word character (here: the query projection of layer 0 alone)
    from cleantune.defenses.lora import apply_lora

    model = apply_lora(load_model(tiny_model, ["a", "b"]), 2, 4, 0.0, r"bert\.encoder\.layer\.0\..*\.query")
    targeted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert targeted == {"base_model.model.bert.encoder.layer.0.attention.self.query"}


def test_fit_hands_the_defenses_loop_settings_to_training(tiny_model, monkeypatch):
    # every loop setting a user gives the defense must reach `train` as given: a dropped weight_decay or
    # warmup_ratio would train with TrainSettings' defaults and store the run under settings it did not use
    import dataclasses

    import cleantune.defenses.base as base
    from cleantune.training import TrainSettings

    seen = []
    monkeypatch.setattr(base, "train", lambda model, tok, data, dev, settings, *a, **k: seen.append(settings))
    given = dict(epochs=2, batch_size=8, lr=2e-4, weight_decay=0.05, warmup_ratio=0.2, max_length=40, seed=9)
    for cls in (FineTune, LoRA):
        cls(model=tiny_model, **given).fit(TextDataset(["good", "bad"], [1, 0], ["a", "b"]), progress=False)
    for settings in seen:
        assert {k: getattr(settings, k) for k in given} == given
        untouched = {f.name for f in dataclasses.fields(TrainSettings)} - set(given)
        assert {k: getattr(settings, k) for k in untouched} == {k: getattr(TrainSettings(), k) for k in untouched}


def test_fit_seeds_the_models_initialisation_with_the_defenses_seed(tiny_model, monkeypatch):
    # the seed must reach what is drawn before training too (LoRA's A matrices, a new head): with seed 0
    # there, every seed of a sweep would start from the same adapter
    import cleantune.defenses.base as base

    drawn = []
    monkeypatch.setattr(base, "train", lambda model, *a, **k: drawn.append(
        torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])))
    data = TextDataset(["good", "bad"], [1, 0], ["a", "b"])
    for seed in (1, 1, 2):
        LoRA(model=tiny_model, epochs=1, seed=seed).fit(data, progress=False)
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_fit_refuses_a_max_length_past_the_position_table_before_training(tiny_model, monkeypatch):
    # the Python API has no CLI check before it: past the tiny model's 130 positions, training would fail in the
    # embeddings on the first long text (an IndexError), or train on what the user did not ask for
    import cleantune.defenses.base as base

    monkeypatch.setattr(base, "train", lambda *a, **k: pytest.fail("trained with an impossible max_length"))
    with pytest.raises(UserError, match=f"--max-length 200 exceeds the 130 tokens --model {tiny_model} takes"):
        FineTune(model=tiny_model, epochs=1, max_length=200).fit(
            TextDataset(["good", "bad"], [1, 0], ["a", "b"]), progress=False)


def test_fits_classifier_truncates_at_the_trained_max_length(tiny_model, monkeypatch):
    # the returned classifier must truncate where training did: at another length it would score texts the
    # model never saw whole, and save that length for every later eval
    import cleantune.defenses.base as base

    monkeypatch.setattr(base, "train", lambda *a, **k: None)
    for cls in (FineTune, LoRA):
        clf = cls(model=tiny_model, epochs=1, max_length=24).fit(TextDataset(["good", "bad"], [1, 0], ["a", "b"]),
                                                                progress=False)
        assert clf.max_length == 24


def test_lora_defaults_are_the_documented_ones(tiny_model):
    # README's defense table: "PEFT LoRA (r 8, alpha 32) on query/value, base frozen", the head trainable.
    # alpha/r scales every LoRA update, so another default alpha trains another model under the same settings
    model = LoRA(model=tiny_model).prepare_model(load_model(tiny_model, ["a", "b"]), None, None)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.0)
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if ".lora_A." in n} == \
        {"query", "value"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)


def test_check_out_dir_refuses_a_file_where_the_previous_model_is_moved_aside(tmp_path):
    # saving moves an earlier model to `<out>.old`: a file there would fail only after the whole training
    from cleantune.models import check_out_dir

    (tmp_path / "m.old").write_text("mine")
    with pytest.raises(UserError, match=r"m\.old is a file; cleantune writes a folder there"):
        check_out_dir(tmp_path / "m")
    check_out_dir(tmp_path / "n")  # nothing beside it: fine


def test_a_missing_path_of_more_than_two_parts_is_a_missing_folder_not_a_hub_id(tmp_path, monkeypatch):
    # a hub id is "org/name", one slash: a relative path with more ("runs/sst2/model", not written yet or mistyped)
    # is a missing folder, refused at once, not sent to the hub as an id (a wait, then a misleading "cannot load")
    monkeypatch.chdir(tmp_path)
    for name in ("runs/sst2/model", "a/b/c/d"):
        with pytest.raises(UserError, match=f"--model {name}: no such directory"):
            resolve_model(name)
    assert resolve_model("runs/model") == "runs/model"  # one slash: a hub id, loaded by transformers on use


def test_predict_leaves_a_model_in_eval_mode_in_eval_mode(tiny_model):
    # the caller's mode comes back both ways: a model in eval mode (from_pretrained's, or the caller's own) must not
    # come back with dropout on, or the caller's forward passes after a predict would turn random
    clf = Classifier(load_model(tiny_model, ["a", "b"]), load_tokenizer(tiny_model), ["a", "b"])
    clf.model.eval()
    clf.predict_logits(["a fine film", "dull"], batch_size=1)
    clf.predict(["a fine film"])
    assert not any(m.training for m in clf.model.modules())


def test_a_label_file_naming_fewer_classes_than_the_model_has_is_the_fault_named(tiny_model, tmp_path):
    # two names for a 3-class head: the label file is what does not fit (the weights are whole), so the error must
    # say so, as it does for more names than classes, not blame the weights for a head that loading re-sized
    from cleantune.models import LABELS_FILE

    m = tmp_path / "three"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3,
                                                       ignore_mismatched_sizes=True).save_pretrained(m)
    load_tokenizer(tiny_model).save_pretrained(m)
    (m / LABELS_FILE).write_text(json.dumps({"label_names": ["neg", "pos"], "max_length": 32}))
    with pytest.raises(UserError, match=f"{m / LABELS_FILE}: 2 label names for a model with 3 classes"):
        Classifier.from_pretrained(m)


def test_a_tokenizer_one_token_past_the_embedding_table_is_refused(tiny_model, tmp_path):
    # a token added to the tokenizer without resizing the model's embeddings: the first text holding it would fail
    # mid-prediction (an index past the table). One token too many is too many; a table that fits exactly loads
    import shutil

    m = shutil.copytree(tiny_model, tmp_path / "m")
    rows = json.loads((m / "config.json").read_text())["vocab_size"]
    tok = load_tokenizer(tiny_model)
    assert len(tok) == rows
    assert Classifier.from_pretrained(m).label_names == ["LABEL_0", "LABEL_1"]
    tok.add_tokens(["cleantuneword"])
    tok.save_pretrained(m)
    with pytest.raises(UserError, match=f"{m}: its tokenizer has {rows + 1} tokens, its model embeds {rows}"):
        Classifier.from_pretrained(m)


def test_a_hub_that_answers_with_an_http_error_counts_as_reachable(monkeypatch):
    # a 404 (a mistyped id) or a 401 (a gated model) is the hub's answer, for the load to report as such: only a
    # failed connection may turn the load into a cache-only one whose error says "the hub cannot be reached"
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    from cleantune import models

    try:  # the HTTP library of the pinned huggingface_hub, as in _NoNetwork
        import httpx2 as httpx
    except ImportError:
        import httpx

    def answers(url, **kwargs):
        response = httpx.Response(404, request=httpx.Request("HEAD", url))
        raise HfHubHTTPError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", answers)
    models._probe_hub.cache_clear()  # remembered per process: a result of another test must not answer here
    try:
        assert models._hub_unreachable("no-org/answered-with-404") is None
    finally:
        models._probe_hub.cache_clear()


def test_a_folder_without_weights_or_tokenizer_is_named_for_its_weights(tiny_model, tmp_path):
    # the weights load first: a folder that lacks both (a config.json copied alone) is reported for its weights,
    # not for a tokenizer file whose fix would only lead to a second error
    import shutil

    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(Path(tiny_model) / "config.json", m / "config.json")
    with pytest.raises(UserError) as e:
        Classifier.from_pretrained(m)
    assert str(e.value).startswith(f"{m}: cannot load (") and "tokenizer" not in str(e.value)


def test_a_model_without_a_position_limit_takes_any_max_length():
    # max_positions is None where the config names no position table (relative positions): no upper bound to
    # check, only the special tokens' lower one
    import types

    from cleantune.models import check_max_length, max_positions

    tok = load_tokenizer(resolve_model("minilm"))
    model = types.SimpleNamespace(config=types.SimpleNamespace())
    assert max_positions(model) is None
    check_max_length(model, tok, 100000, "--model m")
    with pytest.raises(UserError, match="--max-length 2 leaves no token for the text"):
        check_max_length(model, tok, 2, "--model m")


def test_an_xlnet_backbone_takes_any_max_length():
    # XLNet (relative positions) has no position table; its config says -1 for "none". Read as a limit of -1
    # tokens, it refused every --max-length, so an XLNet backbone could not train at all
    from transformers import XLNetConfig, XLNetForSequenceClassification

    from cleantune.models import check_max_length, max_positions

    model = XLNetForSequenceClassification(XLNetConfig(vocab_size=50, d_model=8, n_layer=1, n_head=2, d_inner=8))
    assert max_positions(model) is None
    check_max_length(model, load_tokenizer(resolve_model("minilm")), 128, "--model m")


def test_no_texts_give_logits_of_the_classifiers_width(tiny_model):
    # an empty batch's logits keep the classes' axis (torch.cat with other batches' rows needs it): 3 here, not the
    # binary case's 2
    names = ["neg", "pos", "mixed"]
    clf = Classifier(load_model(tiny_model, names), load_tokenizer(tiny_model), names)
    assert clf.predict_logits([]).shape == (0, 3) == (0, clf.predict_logits("a film").shape[1])


def test_a_missing_folder_under_the_home_folder_is_no_such_directory(tmp_path, monkeypatch):
    # "~/models" has one slash, as a hub id does: missing, it is still a folder the user named, refused at once
    # rather than sent to the hub as the id "~/models"
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="--model ~/models: no such directory"):
        resolve_model("~/models")
