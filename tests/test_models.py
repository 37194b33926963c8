import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from cleantune.data import TextDataset, load_benchmark
from cleantune.defenses import FineTune, LoRA
from cleantune.errors import UserError
from cleantune.models import Classifier, resolve_model


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
    assert torch.allclose(again.predict_logits(dev.texts), before, atol=1e-5)
    assert torch.allclose(Classifier(hf, again.tokenizer, ["neg", "pos"]).predict_logits(dev.texts), before, atol=1e-5)


def test_lora_saves_adapter_and_merged_model(tiny_model, named_data, tmp_path):
    from peft import PeftModel

    data, dev = named_data
    clf = LoRA(model=tiny_model, epochs=1, lr=1e-2).fit(data, None, progress=False)
    before = clf.predict_logits(dev.texts)
    clf.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    merged = Classifier.from_pretrained(tmp_path / "m")
    assert torch.allclose(merged.predict_logits(dev.texts), before, atol=1e-5)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "m" / "adapter")
    assert torch.allclose(Classifier(with_adapter, merged.tokenizer, ["neg", "pos"]).predict_logits(dev.texts),
                          before, atol=1e-5)


def test_save_refuses_what_it_must_not_replace(tiny_model, named_data, tmp_path):
    data, _ = named_data
    clf = FineTune(model=tiny_model, epochs=1, lr=1e-3).fit(data, None, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("x")
    for out, msg in ((tmp_path / "mine", "not a saved cleantune model"), (tmp_path / "file", "not a folder"),
                     (tmp_path / "file" / "m", "cannot create")):
        with pytest.raises(UserError, match=msg):
            clf.save_pretrained(out)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    clf.save_pretrained(tmp_path / "m")
    clf.save_pretrained(tmp_path / "m")  # a saved model is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m", "mine"]


def test_model_names_resolve(tmp_path):
    assert resolve_model("minilm").endswith("model")
    assert resolve_model("org/some-model") == "org/some-model"  # a hub id, loaded by transformers on use
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such directory"):
        resolve_model("./missing/dir")


def test_minilm_is_the_default_backbone():
    from cleantune.models import load_model

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
