"""The MSLR adapter's math and I/O on tiny layers and models: the merged weight by hand, the causal head,
published settings, and the adapter's save/load round trip (every saved setting reaches the rebuilt layer)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cleantune.adapters import MSLRConfig, MSLRLinear, inject_mslr, load_classifier
from cleantune.adapters.mslr import CausalLMHead, apply_adapter, attach_causal_head, published_mslr, register, save_adapter
from cleantune.errors import UserError
from cleantune.models import Classifier, load_model, load_tokenizer
from helpers import tiny_causal


@pytest.mark.parametrize("bias", [True, False])
def test_merged_layer_is_w0_plus_s_r_diag_kappa_l(bias):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias)
    layer = MSLRLinear(base, MSLRConfig(scales=[2, 7], inner_rank=3, alpha=1.5))
    kappa = torch.tensor([2.0, 2, 2, 7, 7, 7])
    W = base.weight + 1.5 / 3 * layer.mslr_R @ torch.diag(kappa) @ layer.mslr_L
    merged = layer.merged()
    assert type(merged) is nn.Linear and (merged.bias is None) == (not bias)  # no bias appears from nowhere
    assert torch.allclose(merged.weight, W, atol=1e-6)
    x = torch.randn(4, 6)
    expected = x @ W.T + (base.bias if bias else 0)
    assert torch.allclose(merged(x), expected, atol=1e-5)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_causal_head_applies_its_dropout_between_the_layers():
    """Spec 2.6: Linear(d -> inner) -> Dropout -> Linear(inner -> C); the dropout acts in train mode only."""
    torch.manual_seed(0)
    head = CausalLMHead(12, 3, inner=64, dropout=0.5)
    Wd, Wo = head.dense.weight, head.out_proj.weight
    x = torch.randn(5, 12)
    head.eval()
    with torch.no_grad():
        assert torch.allclose(head(x), x @ Wd.T @ Wo.T, atol=1e-5)
        assert torch.allclose(head.collapsed()(x), x @ Wd.T @ Wo.T, atol=1e-5)
        head.train()
        torch.manual_seed(1)
        y = head(x)
        torch.manual_seed(1)
        mask = nn.functional.dropout(torch.ones(5, 64), 0.5, training=True)  # the same draw: 0 or 1 / (1 - p)
        assert set(mask.unique().tolist()) == {0.0, 2.0}
        assert torch.allclose(y, ((x @ Wd.T) * mask) @ Wo.T, atol=1e-5)


@pytest.mark.parametrize("model_type", ["xlm-roberta", "camembert"])
def test_roberta_variants_take_robertas_published_scales(model_type):
    """Spec 2.5: XLM-R and CamemBERT are RoBERTa models (a head dense layer, no pooler): RoBERTa's values."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    small = dict(vocab_size=50, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8,
                 max_position_embeddings=16)
    for hidden, scales in ((768, [1, 2, 4, 6, 8, 10, 12, 14, 16]), (1024, list(range(1, 10)))):
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, hidden_size=hidden,
                                                                                    **small))
        assert published_mslr(model) == (scales, 6.0)


def _move(model, seed=1):
    """Every trainable tensor moved, as training would (the saved values must be the trained ones)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_the_adapter_round_trip_keeps_every_saved_setting(tmp_path):
    """A causal head of width 8 with MSLR (scales [1, 3], inner rank 2, alpha 2) on its dense layer: the
    rebuilt head has the saved width, scales and s = alpha / inner_rank, and gives the same outputs."""
    path = tiny_causal("gpt2", tmp_path / "gpt2")
    model = load_model(path, ["a", "b"])
    attach_causal_head(model, inner=8)
    register(model, base_model=path)
    inject_mslr(model, MSLRConfig(scales=[1, 3], inner_rank=2, alpha=2.0))
    _move(model)
    save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["causal_head"] == {"inner": 8}
    assert (meta["mslr"]["scales"], meta["mslr"]["inner_rank"], meta["mslr"]["alpha"]) == ([1, 3], 2, 2.0)

    torch.manual_seed(123)  # another random head: the saved one must replace it
    fresh = load_model(path, ["a", "b"])
    apply_adapter(fresh, tmp_path / "adapter")
    layer = fresh.score.dense
    assert isinstance(layer, MSLRLinear) and layer.base_linear.out_features == 8 and fresh.score.out_proj.in_features == 8
    assert layer.scaling == 1.0 and torch.equal(layer.mslr_kappa, torch.tensor([1.0, 1, 3, 3]))
    h = torch.randn(4, 32)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh.score(h), model.score(h), atol=1e-6)


def test_save_adapter_records_the_given_base_model(tiny_model, tmp_path):
    """The base a defense registers (its --model, e.g. a short name) or the one given, not the resolved path."""
    model = load_model(tiny_model, ["a", "b"])
    register(model, base_model="minilm")
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model"] == "minilm"
    save_adapter(model, tmp_path / "b", base_model="org/other")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model"] == "org/other"


def test_load_classifier_keeps_the_saved_max_length_and_predicts_as_saved(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["neg", "pos"])
    register(model, base_model=tiny_model)
    model.requires_grad_(False)
    layer = inject_mslr(model, MSLRConfig(scales=[1, 4], alpha=0.5))
    for p in (layer.mslr_L, layer.mslr_R):  # as a defense trains it: MSLR alone
        p.requires_grad_(True)
    _move(model)
    texts = ["a fine film with a long and winding plot that goes on", "dull", "ok"]
    clf = Classifier(model, tok, ["neg", "pos"], max_length=6)
    before = clf.predict_logits(texts)
    clf.save_pretrained(tmp_path / "m")
    again = load_classifier(tmp_path / "m")
    assert again.max_length == 6 and again.label_names == ["neg", "pos"]
    assert torch.allclose(again.predict_logits(texts), before, atol=1e-5)


def test_load_classifier_refuses_a_damaged_or_incomplete_folder_in_one_line(tiny_model, tmp_path):
    """It loaded without a missing adapter/ (predicting otherwise than the saved model, silently), and raised
    KeyError, JSONDecodeError or SafetensorError on a damaged file, where from_pretrained says what is wrong."""
    import shutil

    base = shutil.copytree(tiny_model, tmp_path / "base")
    model = load_model(str(base), ["neg", "pos"])
    register(model, base_model=str(base), lora=True)  # as the LoRA variants register theirs
    inject_mslr(model, MSLRConfig(scales=[1, 4], alpha=0.5))
    Classifier(model, load_tokenizer(str(base)), ["neg", "pos"]).save_pretrained(tmp_path / "m")

    def refused(folder, message, **kw):
        with pytest.raises(UserError) as e:
            load_classifier(folder, **kw)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)

    refused(tmp_path / "m", f"{tmp_path / 'm'}: its model was trained with a PEFT LoRA adapter, and adapter/ is missing")
    refused(tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such model directory")
    for damage, message in (
            (lambda d: (d / "cleantune_adapter" / "adapter_config.json").write_text('{"lora": fa'),
             f"{tmp_path / 'd' / 'cleantune_adapter' / 'adapter_config.json'}: not a valid adapter config"),
            (lambda d: (d / "cleantune_labels.json").write_text('{"max_length": 8}'),
             f"{tmp_path / 'd' / 'cleantune_labels.json'}: not a valid label file (KeyError"),
            (lambda d: (d / "cleantune_adapter" / "adapter_model.safetensors").write_bytes(b"cut"),
             f"{tmp_path / 'd' / 'cleantune_adapter' / 'adapter_model.safetensors'}: cannot read the adapter's weights"),
            (lambda d: shutil.rmtree(base),
             f"{base} (the base model {tmp_path / 'd' / 'cleantune_adapter' / 'adapter_config.json'} names; "
             "pass base_model= where it moved): no such directory")):
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        shutil.copytree(tmp_path / "m", tmp_path / "d")
        (tmp_path / "d" / "adapter").mkdir()  # past the LoRA check: each damage is what is refused
        damage(tmp_path / "d")
        refused(tmp_path / "d", message)


def test_config_refuses_a_zero_scale_and_a_zero_inner_rank():
    """A scale of 0 is a dead branch (kappa_j x = 0), and inner_rank 0 leaves no rank and divides alpha by 0:
    both are refused when the config is built, as UserErrors, not later as a ZeroDivisionError."""
    with pytest.raises(UserError, match=r"scales must be a non-empty list of positive numbers, got \[1, 0\]"):
        MSLRConfig(scales=[1, 0])
    with pytest.raises(UserError, match="inner_rank must be at least 1, got 0"):
        MSLRConfig(inner_rank=0)
