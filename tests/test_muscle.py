"""MuScleLoRA mechanics on tiny random models: the MSLR layer, gradient alignment, what trains,
reference/selection split, save/reload, causal-LM heads."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from cleantune.adapters import MSLRConfig, MSLRLinear, inject_mslr, load_classifier
from cleantune.data import TextDataset, load_benchmark
from cleantune.defenses import get_defense
from cleantune.defenses.muscle import GradientAlignment, MuScleLoRA, align, align_all, ga_mode, project, ref_groups, split_refs
from cleantune.errors import UserError
from cleantune.models import Classifier, load_model, load_tokenizer
from cleantune.training import StepContext, TrainSettings, make_batch, encode
from helpers import tiny_causal


def test_mslr_forward_is_the_per_scale_sum():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    cfg = MSLRConfig(scales=[1, 3, 5], inner_rank=2, alpha=4.0)
    layer = MSLRLinear(base, cfg)
    x = torch.randn(7, 6)
    s = cfg.alpha / cfg.inner_rank
    expected = base(x)
    for j, k in enumerate(cfg.scales):  # branch j: R_j L_j (k_j x), rank inner_rank
        L_j = layer.mslr_L[2 * j: 2 * j + 2]
        R_j = layer.mslr_R[:, 2 * j: 2 * j + 2]
        expected = expected + s * (k * x) @ L_j.T @ R_j.T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.merged()(x), expected, atol=1e-5)
    assert torch.equal(layer.mslr_kappa, torch.tensor([1.0, 1, 3, 3, 5, 5]))


def test_mslr_init_is_kaiming_uniform_and_non_zero():
    torch.manual_seed(0)
    layer = MSLRLinear(nn.Linear(64, 32), MSLRConfig(scales=[1, 4, 8, 12], inner_rank=1, alpha=6.0))
    for t, fan_in in ((layer.mslr_L, 64), (layer.mslr_R, 4)):
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5))
        assert t.abs().max() <= bound + 1e-6
        assert t.abs().max() > 0.8 * bound  # spread over the whole range: not zero, not tiny
    assert layer.delta_weight().norm() > layer.base_linear.weight.norm()  # large at step 0 (spec 2.3)
    assert not layer.base_linear.weight.requires_grad and not layer.mslr_kappa.requires_grad


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_only_lora_and_mslr_train(tiny_model):
    tok = load_tokenizer(tiny_model)
    d = get_defense("muscle-lora", model=tiny_model)
    model = d.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    names = _trainable(model)
    assert names and all("lora_" in n or "mslr_" in n for n in names)
    assert sum("mslr_" in n for n in names) == 2 and any("pooler.dense.mslr_L" in n for n in names)
    assert d.resolved_["scales"] == [1, 4, 8, 12, 16, 20, 24, 28] and d.resolved_["mslr_alpha"] == 6.0
    assert d.train_settings().lr == d.resolved_["lr"] == 2e-5  # lr left unset: resolved for the backbone
    # ablations: no MSLR in ga-lora, everything trains in ga
    m2 = get_defense("ga-lora", model=tiny_model).prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    assert all("lora_" in n for n in _trainable(m2))
    m3 = load_model(tiny_model, ["a", "b"])
    get_defense("ga", model=tiny_model).prepare_model(m3, tok, None)
    assert len(_trainable(m3)) == len(list(m3.parameters()))


def test_per_backbone_lr_and_alpha():
    """Published backbones keep the paper's lr and alpha; a 384-wide BERT (MiniLM) takes the values tuned on
    clean dev (TUNED); settings given explicitly always win."""
    from transformers import BertConfig, BertForSequenceClassification

    from cleantune.defenses.base import Defense
    from cleantune.defenses.muscle import TUNED

    def model(hidden):
        return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=1,
                                                        num_attention_heads=4, intermediate_size=32))

    base = get_defense("muscle-lora").resolve(model(768))
    assert base["lr"] == 2e-5 and base["mslr_alpha"] == 6.0
    minilm = get_defense("muscle-lora").resolve(model(384))
    assert (minilm["lr"], minilm["mslr_alpha"]) == (TUNED[("bert", 384)]["lr"], TUNED[("bert", 384)]["mslr_alpha"])
    assert get_defense("ga").resolve(model(384))["lr"] == Defense.lr  # full fine-tuning keeps its own lr
    assert get_defense("ga").resolve(model(768))["lr"] == 2e-5
    from transformers import GPT2Config, GPT2ForSequenceClassification
    causal = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, num_labels=2))
    assert get_defense("muscle-lora").resolve(causal)["lr"] == 1e-5
    given = get_defense("muscle-lora", lr=1e-4, mslr_alpha=2.0).resolve(model(384))
    assert (given["lr"], given["mslr_alpha"]) == (1e-4, 2.0)


def test_projection_and_gating_by_hand():
    g, r = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    # <g, r> = -2, ||r||^2 = 2: |-2| / 2 * r, pointing along +r although g opposes r
    assert torch.allclose(project(g, r), torch.tensor([0.0, 1.0, 1.0]))
    assert torch.allclose(align(g, r, "mix", 0.25), 0.75 * torch.tensor([0.0, 1.0, 1.0]) + 0.25 * g)
    assert torch.equal(align(g, r, "raw", 1.0), g)
    assert torch.equal(align(g, torch.zeros(3), "project", 0.0), g)  # zero reference: keep g
    assert torch.equal(align(g, None, "project", 0.0), g)
    plm = dict(min_ref_grad_norm=5e-7, min_ref_loss=0.4, ga_epoch=1, max_raw_grad_ratio=0.1)
    assert ga_mode(1e-3, 0.5, 0, 10, **plm) == ("project", 0.0)
    assert ga_mode(1e-3, 0.3, 0, 10, **plm) == ("raw", 1.0)        # epoch 0 < GAEpoch: raw gradient
    mode, mu = ga_mode(1e-3, 0.3, 4, 10, **plm)
    assert mode == "mix" and mu == pytest.approx(0.1 * 3 / 9)
    assert ga_mode(1e-9, 0.9, 4, 10, **plm)[0] == "mix"             # tiny reference gradient
    llm = dict(min_ref_grad_norm=5e-7, min_ref_loss=0.0, ga_epoch=0, max_raw_grad_ratio=0.0)
    assert ga_mode(1e-3, 0.01, 3, 5, **llm) == ("project", 0.0)
    assert ga_mode(1e-9, 0.01, 3, 5, **llm) == ("raw", 1.0)


def official_projection(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The official ga_trainer's expression, in float64: torch.cosine_similarity divides by each norm clamped
    at 1e-8, then |cos * ||g|| / ||r||| * r."""
    g, r = g.double().flatten(), r.double().flatten()
    cos = torch.nn.functional.cosine_similarity(g, r, dim=0)
    return (torch.norm(g) * cos / torch.norm(r)).abs() * r


def test_projection_clamps_short_gradients_as_the_official_cosine():
    g = torch.tensor([1.0, -2.0, 0.0])
    tiny = torch.tensor([0.0, 1e-23, 1e-23])  # ||r||^2 underflows to 0 in float32
    # the unclamped step [0, 1, 1], shrunk by ||r|| / 1e-8 (the spec's bare formula would give [0, 1, 1])
    assert torch.allclose(project(g, tiny), torch.tensor([0.0, 1.0, 1.0]) * (2 ** 0.5 * 1e-23 / 1e-8))
    torch.manual_seed(0)
    big = torch.randn(768, 768)
    for g, r in ((big, torch.randn(768, 768) * 5e-23),   # ||r||^2 subnormal in float32
                 (big, torch.randn(768, 768) * 1e-12),   # ||r|| 8e-10: clamped, all normal floats
                 (big * 1e-12, torch.randn(768, 768)),   # a short training gradient is clamped too
                 (big, torch.randn(768, 768) * 1e-6)):   # no clamp: the float32 formula
        expected = official_projection(g, r)
        assert torch.allclose(project(g, r).double().flatten(), expected, rtol=1e-5, atol=0), r.norm()
    # where float32 holds every value, the official float32 expression itself gives the same step
    g, r = torch.randn(1000) * 1e-3, torch.randn(1000) * 1e-12
    cos = torch.cosine_similarity(g, r, dim=0)
    assert torch.allclose(project(g, r), (torch.norm(g) * cos / torch.norm(r)).abs() * r, rtol=1e-5, atol=0)
    # the unclamped step (a reference of the same direction, longer than 1e-8), shrunk by ||r|| / 1e-8
    assert torch.allclose(project(g, r), project(g, r * 1e6) * (r.norm() / 1e-8), rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode,mu", [("project", 0.0), ("mix", 0.3)])
def test_align_all_is_the_per_tensor_formula_bit_for_bit(mode, mu):
    torch.manual_seed(0)
    # 24 LoRA-sized tensors (one stacked group), odd sizes, three above the parallel grain (never stacked:
    # their float32 sums differ from a stacked row's), a zero gradient, a zero and a missing reference,
    # one memorised reference and one short gradient (the float64 path)
    shapes = [(8, 384)] * 12 + [(384, 8)] * 12 + [(7, 384), (384,), (40000,), (40000,), (200, 200)]
    grads = [torch.randn(s) * 10 ** torch.empty(1).uniform_(-6, 0).item() for s in shapes]
    refs = [torch.randn(s) * 10 ** torch.empty(1).uniform_(-6, 0).item() for s in shapes]
    grads[3] = torch.zeros(shapes[3])
    refs[5], refs[6] = torch.zeros(shapes[5]), None
    refs[7] = torch.randn(shapes[7]) * 1e-23
    grads[9] = torch.randn(shapes[9]) * 1e-11
    expected = []
    for g, r in zip(grads, refs):
        if r is None or not g.any() or not r.any():
            expected.append(g)
            continue
        g_a = project(g, r)
        expected.append(g_a if mode == "project" else (1 - mu) * g_a + mu * g)
    got = align_all(grads, refs, mode, mu)
    assert len(ref_groups(refs)) == 6  # the 23 LoRA-sized references stacked, the 5 others alone
    for i, (e, a) in enumerate(zip(expected, got)):
        assert a.shape == e.shape and torch.equal(a, e), i
    assert got[3] is grads[3] and got[5] is grads[5] and got[6] is grads[6]


def test_gradient_alignment_hook_pairs_by_parameter(tiny_model):
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, ["a", "b"])
    # an unused trainable tensor early in the parameter order: the official zip would shift every pair
    model.bert.embeddings.register_parameter("unused", nn.Parameter(torch.ones(3)))
    refs = TextDataset([f"good film {i}" for i in range(6)] + [f"bad film {i}" for i in range(6)], [1] * 6 + [0] * 6,
                       ["a", "b"])
    hook = GradientAlignment(tok, refs, batch_size=4, max_length=16, seed=0, min_ref_loss=0.0,
                             min_ref_grad_norm=0.0, ga_epoch=0, max_raw_grad_ratio=0.0)
    model.train()
    batch = make_batch(encode(tok, ["a dull story", "a fine cast"], 16), tok.pad_token_id)
    loss = nn.functional.cross_entropy(model(**batch).logits, torch.tensor([0, 1]))
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    raw = [None if p.grad is None else p.grad.clone() for p in params]
    ctx = StepContext(model, None, epoch=0, step=3, steps_per_epoch=10, settings=TrainSettings(epochs=2))
    torch.manual_seed(1)
    _, ref = hook.reference_gradients(model, params, 3, torch.device("cpu"))
    torch.manual_seed(1)  # same dropout masks in the hook's own reference pass
    hook.after_backward(ctx)
    assert params[next(i for i, p in enumerate(params) if p.shape == (3,))].grad is None
    checked = 0
    for p, g, r in zip(params, raw, ref):
        if g is None:
            continue
        assert torch.allclose(p.grad, align(g, r, "project", 0.0), atol=1e-6, rtol=1e-4)
        checked += r is not None and bool(r.any()) and bool(g.any())
    assert checked > 10
    assert ctx.logs["ga_project"] == 1.0


def test_references_are_excluded_from_selection(tiny_model):
    dev = load_benchmark("sst2").dev
    tok = load_tokenizer(tiny_model)
    d = get_defense("muscle-lora", model=tiny_model)
    model = d.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    (hook,) = d.hooks(model, tok, None, dev)
    selection = d.selection_data(dev)
    assert len(hook.refs) == 96 and len(selection) == len(dev) - 96
    assert not set(hook.refs.texts) & set(selection.texts)
    # every variant with GA gets the same references (the draw does not depend on the model)
    g = get_defense("ga-lora", model=tiny_model)
    g.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    assert g.hooks(None, tok, None, dev)[0].refs.texts == hook.refs.texts
    assert get_defense("lora-mslr", model=tiny_model).selection_data(dev) is dev
    with pytest.raises(UserError, match=r"ref_samples=96 leaves no clean dev sample for model selection \(50 given"):
        split_refs(dev.subset(range(50)), 96, 0)
    with pytest.raises(UserError, match=r"\(96 given\)"):  # all of them references: nothing left to select the epoch
        split_refs(dev.subset(range(96)), 96, 0)
    with pytest.raises(UserError, match=r"needs clean labelled dev data \(--dev\) for gradient alignment"):
        d.hooks(model, tok, None, None)


@pytest.fixture(scope="module")
def small_data():
    b = load_benchmark("sst2")
    return b.train.stratified_sample(48, 0), b.dev.subset(range(130)), b.test.texts[:60]


def test_save_and_reload_give_identical_predictions(tiny_model, small_data, tmp_path):
    train, dev, texts = small_data
    d = get_defense("muscle-lora", model=tiny_model, epochs=1, batch_size=16, ref_samples=32, lr=5e-3)
    clf = d.fit(train, dev, progress=False)
    assert d.report_.history[0]["ga_project"] + d.report_.history[0]["ga_raw"] + d.report_.history[0]["ga_mix"] == 1
    before = clf.predict_logits(texts)
    clf.save_pretrained(tmp_path / "first")
    clf.save_pretrained(tmp_path / "m")  # saving merges a copy: the second save still has the adapters
    assert (tmp_path / "m" / "adapter").is_dir() and (tmp_path / "m" / "cleantune_adapter").is_dir()
    assert any("mslr" in n for n, _ in clf.model.named_parameters())
    merged = Classifier.from_pretrained(tmp_path / "m")
    assert not any("mslr" in n or "lora" in n for n, _ in merged.model.named_parameters())
    with warnings.catch_warnings():  # PEFT's deprecation notice for its developers is not the user's
        warnings.simplefilter("error", FutureWarning)
        adapter_only = load_classifier(tmp_path / "m")
    for other in (merged, adapter_only):
        after = other.predict_logits(texts)
        assert torch.allclose(before, after, atol=1e-5)
        assert torch.equal(before.argmax(-1), after.argmax(-1))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_head_forward_backward_and_export(kind, tmp_path):
    path = tiny_causal(kind, tmp_path / kind)
    tok = load_tokenizer(path)
    d = get_defense("muscle-lora", model=path)
    model = d.prepare_model(load_model(path, ["a", "b"]), tok, None)
    r = d.resolved_
    assert (r["lora_r"], r["lora_alpha"], r["ref_samples"], r["min_ref_loss"], r["ga_epoch"]) == (2, 8, 128, 0.0, 0)
    assert r["scales"] == [1, 2, 3, 4] and r["mslr_alpha"] == 4.0
    head = model.get_base_model().score
    assert (head.dense.base_linear.in_features, head.dense.base_linear.out_features) == (32, 16)
    assert head.dense.base_linear.bias is None and head.out_proj.bias is None
    assert head.dropout.p == 0.1  # spec 2.6: the official head's dropout between the two layers
    texts = ["a fine film", "dull , long and loud movie", "ok"]
    batch = make_batch(encode(tok, texts, 32), tok.pad_token_id)
    model.train()
    logits = model(**batch).logits
    assert logits.shape == (3, 2)
    nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1])).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # LoRA's B starts at zero, so A's first gradient is zero; B and both MSLR factors get one
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" not in n)
    assert any("mslr_L" in n for n in grads) and any("lora_A" in n for n in grads)
    assert head.out_proj.weight.grad is None  # the head is frozen
    clf = Classifier(model, tok, ["a", "b"], 32)
    before = clf.predict_logits(texts)
    clf.save_pretrained(tmp_path / "out")
    merged = Classifier.from_pretrained(tmp_path / "out")
    assert isinstance(merged.model.score, nn.Linear)  # a plain HF checkpoint
    assert torch.allclose(before, merged.predict_logits(texts), atol=1e-5)
    assert torch.allclose(before, load_classifier(tmp_path / "out").predict_logits(texts), atol=1e-5)


def test_inject_rejects_bad_targets(tiny_model):
    model = load_model(tiny_model, ["a", "b"])
    with pytest.raises(UserError, match="MSLR target module 'bert.nothing' not found in BertForSequenceClassification"):
        inject_mslr(model, MSLRConfig(target_module="bert.nothing"))
    with pytest.raises(UserError, match="MSLR target module 'bert.embeddings' is a BertEmbeddings, not a Linear layer"):
        inject_mslr(model, MSLRConfig(target_module="bert.embeddings"))
    with pytest.raises(UserError, match=r"scales must be a non-empty list of positive numbers, got \[\]"):
        MSLRConfig(scales=[])


def test_published_scales_by_family_and_width():
    """Spec 2.5: a 1024-wide encoder (bert/roberta-large) takes the large-size scales 1..9, narrower ones their
    family's base-size scales."""
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    from cleantune.adapters.mslr import published_mslr

    small = dict(vocab_size=50, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8,
                 max_position_embeddings=16)
    for cls, config, base in ((BertForSequenceClassification, BertConfig, [1, 4, 8, 12, 16, 20, 24, 28]),
                              (RobertaForSequenceClassification, RobertaConfig, [1, 2, 4, 6, 8, 10, 12, 14, 16])):
        assert published_mslr(cls(config(hidden_size=768, **small))) == (base, 6.0)
        assert published_mslr(cls(config(hidden_size=1024, **small))) == (list(range(1, 10)), 6.0)


def test_roberta_mslr_wraps_the_head_dense_layer(tmp_path):
    """Spec 2.4: RoBERTa has no pooler; MSLR goes on classifier.dense (before the tanh), not on out_proj."""
    from conftest import make_tiny_model

    path = str(make_tiny_model(tmp_path / "roberta", "roberta"))
    d = get_defense("muscle-lora", model=path)
    model = d.prepare_model(load_model(path, ["a", "b"]), load_tokenizer(path), None)
    head = model.get_base_model().classifier
    assert isinstance(head.dense, MSLRLinear) and type(head.out_proj) is nn.Linear
    assert torch.equal(head.dense.mslr_kappa, torch.tensor([1.0, 2, 4, 6, 8, 10, 12, 14, 16]))
    assert not head.out_proj.weight.requires_grad


def test_plm_defaults_reach_lora_and_the_hook(tiny_model):
    """The encoder values (spec 3.3, 16.3) must reach the LoRA layers and the gating, not only `resolved_`."""
    tok = load_tokenizer(tiny_model)
    d = get_defense("muscle-lora", model=tiny_model)
    model = d.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.0)
    assert sorted(cfg.target_modules) == ["query", "value"]  # PEFT's default for BERT
    (hook,) = d.hooks(model, tok, None, load_benchmark("sst2").dev)
    assert hook.gating == dict(min_ref_grad_norm=5e-7, min_ref_loss=0.4, ga_epoch=1, max_raw_grad_ratio=0.1)


def test_train_head_and_target_modules_are_honoured(tiny_model):
    model = get_defense("muscle-lora", model=tiny_model, train_head=True, target_modules=["query"]).prepare_model(
        load_model(tiny_model, ["a", "b"]), load_tokenizer(tiny_model), None)
    names = _trainable(model)
    assert any(".classifier." in n for n in names)
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".query." in n for n in lora)


def test_gating_at_its_boundaries():
    plm = dict(min_ref_grad_norm=5e-7, min_ref_loss=0.4, ga_epoch=1, max_raw_grad_ratio=0.1)
    # the official tests are strict: a reference loss of exactly minRefLoss no longer projects
    assert ga_mode(1e-3, 0.4, 0, 10, **plm) == ("raw", 1.0)
    # epoch == GAEpoch already mixes, with mu = 0 (the projection), not the raw poisoned gradient
    assert ga_mode(1e-3, 0.3, 1, 10, **plm) == ("mix", 0.0)
    assert ga_mode(1e-3, 0.3, 9, 10, **plm)[1] == pytest.approx(0.1 * 8 / 9)
    llm = dict(min_ref_grad_norm=5e-7, min_ref_loss=0.0, ga_epoch=0, max_raw_grad_ratio=0.0)
    assert ga_mode(1e-3, 0.0, 3, 5, **llm) == ("raw", 1.0)


class _TwoTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))


def _hook_step(tiny_model, ref_a, ref_loss, epoch, **gating):
    """One after_backward on two tensors with given gradients, the reference gradients stubbed: (grads, logs)."""
    refs = TextDataset(["good", "bad"], [1, 0], ["a", "b"])
    hook = GradientAlignment(load_tokenizer(tiny_model), refs, batch_size=2, max_length=8, seed=0, **gating)
    hook.reference_gradients = lambda model, params, step, device, need_grads=None: (ref_loss, [ref_a, torch.zeros(3)])
    model = _TwoTensors()
    model.a.grad, model.b.grad = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.ones(3)
    ctx = StepContext(model, None, epoch=epoch, step=0, steps_per_epoch=1, settings=TrainSettings(epochs=10))
    hook.after_backward(ctx)
    return model.a.grad, model.b.grad, ctx.logs


def test_hook_gates_on_the_mean_of_non_zero_reference_norms(tiny_model):
    """Spec 3.2 step 3: tensors whose reference gradient is zero (LoRA A at step 0) do not drag the mean norm
    below minRefGradNorm; and the gate sees the loop's epoch (the mixing schedule)."""
    g_a, r_a = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    # mean over the one non-zero norm: above the threshold -> project; over both it would be half of it
    a, b, logs = _hook_step(tiny_model, r_a, 1.0, 0, min_ref_loss=0.0, min_ref_grad_norm=0.75 * r_a.norm().item(),
                            ga_epoch=0, max_raw_grad_ratio=0.0)
    assert logs["ga_project"] == 1.0 and torch.allclose(a, project(g_a, r_a)) and torch.equal(b, torch.ones(3))
    # reference loss under minRefLoss in epoch 4: mix with mu = 0.1 * (4 - 1) / (10 - 1)
    a, _, logs = _hook_step(tiny_model, r_a, 0.3, 4, min_ref_loss=0.4, min_ref_grad_norm=5e-7, ga_epoch=1,
                            max_raw_grad_ratio=0.1)
    mu = 0.1 * 3 / 9
    assert logs["ga_mix"] == 1.0 and torch.allclose(a, (1 - mu) * project(g_a, r_a) + mu * g_a)


def test_each_step_draws_one_fresh_reference_batch(tiny_model, monkeypatch):
    """Spec 3.1: each step takes the first batch_size references of a fresh shuffle: a batch, not all of them,
    a different one per step, and the same one again for the same seed and step (reproducible runs)."""
    import cleantune.defenses.muscle as muscle

    tok = load_tokenizer(tiny_model)
    refs = TextDataset([f"film number {i}" for i in range(12)], [i % 2 for i in range(12)], ["a", "b"])
    hook = GradientAlignment(tok, refs, batch_size=4, max_length=16, seed=0, min_ref_loss=0.0,
                             min_ref_grad_norm=0.0, ga_epoch=0, max_raw_grad_ratio=0.0)
    seen = []
    monkeypatch.setattr(muscle, "make_batch", lambda ids, pad: seen.append(tuple(map(tuple, ids))) or make_batch(ids, pad))
    model = load_model(tiny_model, ["a", "b"])
    params = [model.classifier.weight]
    for step in (0, 1, 2, 0):
        hook.reference_gradients(model, params, step, torch.device("cpu"))
    assert [len(b) for b in seen] == [4] * 4
    assert len(set(seen[:3])) == 3 and seen[3] == seen[0]


def test_an_adapter_that_does_not_fit_is_refused(tiny_model, tmp_path):
    """`load_classifier(path, base_model=...)` on the wrong backbone: one line naming the tensor, not a KeyError."""
    from conftest import make_tiny_model

    from cleantune.adapters.mslr import apply_adapter, register, save_adapter

    bert = load_model(tiny_model, ["a", "b"])
    register(bert, base_model=tiny_model)  # as ga-lora does: the adapter is the frozen head alone
    save_adapter(bert, tmp_path / "adapter")
    roberta = load_model(str(make_tiny_model(tmp_path / "roberta", "roberta")), ["a", "b"])
    with pytest.raises(UserError, match="adapter tensor 'classifier.bias' does not fit RobertaForSequenceClassification"):
        apply_adapter(roberta, tmp_path / "adapter")
    with pytest.raises(UserError, match=r"adapter tensor 'classifier.bias' has shape \(2,\), the model's has \(3,\)"):
        apply_adapter(load_model(tiny_model, ["a", "b", "c"]), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").rename(tmp_path / "cleantune_adapter.json")
    (tmp_path / "cleantune_adapter").mkdir()
    (tmp_path / "cleantune_adapter.json").rename(tmp_path / "cleantune_adapter" / "adapter_config.json")
    with pytest.raises(UserError, match="no cleantune_labels.json"):
        load_classifier(tmp_path)


def _save_and_reload(model, tok, tmp_path, texts=("a fine film", "dull , long and loud movie", "ok")):
    """(in-memory logits, merged model's, the saved folder): the model saved as `cleantune train` saves it."""
    clf = Classifier(model, tok, ["a", "b"], 32)
    before = clf.predict_logits(list(texts))
    clf.save_pretrained(tmp_path / "out")
    return before, Classifier.from_pretrained(tmp_path / "out").predict_logits(list(texts)), tmp_path / "out"


def _as_if_trained(model):
    """Every trainable tensor moved: what a real step would change, without one."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_train_head_leaves_the_mslr_base_frozen(kind, tmp_path):
    """Where MSLR wraps a layer of the head (RoBERTa's classifier.dense, the causal head's dense), train_head
    trains the rest of the head and MSLR's factors, never W0 (spec 2.6, 16.4): W0 is the frozen base."""
    from conftest import make_tiny_model

    path = str(make_tiny_model(tmp_path / kind, kind)) if kind == "roberta" else tiny_causal(kind, tmp_path / kind)
    model = get_defense("muscle-lora", model=path, train_head=True).prepare_model(
        load_model(path, ["a", "b"]), load_tokenizer(path), None)
    head = "classifier" if kind == "roberta" else "score"
    names = [n.split(f".{head}.", 1)[1] for n in _trainable(model) if f".{head}." in n]
    assert sorted(names) == sorted(["dense.mslr_L", "dense.mslr_R", "out_proj.weight"]
                                   + (["out_proj.bias"] if kind == "roberta" else []))


def test_mslr_on_the_causal_heads_output_layer_saves_and_reloads(tmp_path):
    """mslr_target=score.out_proj: the head collapses with MSLR merged into either of its layers."""
    path = tiny_causal("gpt2", tmp_path / "gpt2")
    tok = load_tokenizer(path)
    model = get_defense("lora-mslr", model=path, mslr_target="score.out_proj").prepare_model(
        load_model(path, ["a", "b"]), tok, None)
    assert isinstance(model.get_base_model().score.out_proj, MSLRLinear)
    _as_if_trained(model)
    before, merged, out = _save_and_reload(model, tok, tmp_path)
    assert torch.allclose(before, merged, atol=1e-5)
    assert torch.allclose(before, load_classifier(out).predict_logits(["a fine film", "dull , long and loud movie",
                                                                      "ok"]), atol=1e-5)


def test_ga_on_a_causal_lm_saves_no_adapter(tmp_path):
    """`ga` fine-tunes every weight: the head alone on the base checkpoint would be another model, so no
    cleantune_adapter/ is written and load_classifier refuses, as for an encoder."""
    path = tiny_causal("gpt2", tmp_path / "gpt2")
    tok = load_tokenizer(path)
    model = get_defense("ga", model=path).prepare_model(load_model(path, ["a", "b"]), tok, None)
    _as_if_trained(model)
    before, merged, out = _save_and_reload(model, tok, tmp_path)
    assert torch.allclose(before, merged, atol=1e-5)
    assert not (out / "cleantune_adapter").exists()
    with pytest.raises(UserError, match="saved without a cleantune adapter"):
        load_classifier(out)


@pytest.mark.parametrize("targets", [["q_lin", "v_lin"], ["q_lin", "v_lin", "pre_classifier"]])
def test_layers_the_base_checkpoint_lacks_travel_with_the_adapter(targets, tmp_path):
    """A DistilBERT base without a head: pre_classifier starts random like the head, so load_classifier must
    bring it back too, or it predicts with another random layer; where LoRA adapts it, without LoRA's delta
    (which load_classifier adds once more)."""
    from transformers import DistilBertConfig, DistilBertModel

    from cleantune.models import resolve_model

    tok = load_tokenizer(resolve_model("minilm"))
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=64)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    path = str(tmp_path / "base")
    model = get_defense("ga-lora", model=path, target_modules=targets).prepare_model(
        load_model(path, ["a", "b"]), tok, None)
    _as_if_trained(model)
    before, merged, out = _save_and_reload(model, tok, tmp_path)
    assert torch.allclose(before, merged, atol=1e-5)
    torch.manual_seed(123)  # another draw for whatever load_classifier initialises at random
    assert torch.allclose(before, load_classifier(out).predict_logits(["a fine film", "dull , long and loud movie",
                                                                      "ok"]), atol=1e-5)


def test_the_adapter_records_a_relative_base_path_as_absolute(tiny_model, tmp_path, monkeypatch):
    """MuScleLoRA(model="models/x") through the Python API: load_classifier must work from another folder."""
    import os
    import shutil

    shutil.copytree(tiny_model, tmp_path / "models" / "bert")
    monkeypatch.chdir(tmp_path)
    model = get_defense("muscle-lora", model="models/bert").prepare_model(
        load_model("models/bert", ["a", "b"]), load_tokenizer("models/bert"), None)
    _as_if_trained(model)
    before, _, out = _save_and_reload(model, load_tokenizer("models/bert"), tmp_path)
    monkeypatch.chdir(out)
    assert os.path.isabs(model._cleantune_adapter["base_model"])
    assert torch.allclose(before, load_classifier(out).predict_logits(["a fine film", "dull , long and loud movie",
                                                                      "ok"]), atol=1e-5)
    card = (out / "adapter" / "README.md").read_text()
    assert "not the trained model" in card and "load_classifier" in card  # the recipe alone would be wrong


def test_reference_loss_pairs_each_drawn_text_with_its_own_label(tiny_model, monkeypatch):
    """The reference loss and gradient are a cross-entropy over exactly the drawn (text, label) pairs."""
    import cleantune.defenses.muscle as muscle

    tok = load_tokenizer(tiny_model)
    texts = [f"film number {i} was {w}" for i, w in enumerate(["fine", "dull", "long", "great"] * 3)]
    labels = [1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0]
    refs = TextDataset(texts, labels, ["a", "b"])
    hook = GradientAlignment(tok, refs, batch_size=5, max_length=16, seed=0, min_ref_loss=0.0,
                             min_ref_grad_norm=0.0, ga_epoch=0, max_raw_grad_ratio=0.0)
    label_of = {tuple(ids): y for ids, y in zip(encode(tok, texts, 16), labels)}
    drawn = []
    monkeypatch.setattr(muscle, "make_batch", lambda ids, pad: drawn.append(ids) or make_batch(ids, pad))
    model = load_model(tiny_model, ["a", "b"])  # eval mode: no dropout, the same logits twice
    params = [model.classifier.weight, model.bert.pooler.dense.weight]
    for step in range(3):
        loss, grads = hook.reference_gradients(model, params, step, torch.device("cpu"))
        ids = drawn[-1]
        y = torch.tensor([label_of[tuple(x)] for x in ids])
        expected = nn.functional.cross_entropy(model(**make_batch(ids, tok.pad_token_id)).logits, y)
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        for g, e in zip(grads, torch.autograd.grad(expected, params)):
            assert torch.allclose(g, e, atol=1e-7)


def test_given_scales_and_inner_rank_reach_the_mslr_layer(tiny_model):
    d = get_defense("muscle-lora", model=tiny_model, scales=[1, 3], inner_rank=2)
    model = d.prepare_model(load_model(tiny_model, ["a", "b"]), load_tokenizer(tiny_model), None)
    layer = model.get_base_model().bert.pooler.dense
    assert torch.equal(layer.mslr_kappa, torch.tensor([1.0, 1, 3, 3]))
    assert layer.mslr_L.shape == (4, 32) and layer.mslr_R.shape == (32, 4)
    assert layer.scaling == d.resolved_["mslr_alpha"] / 2


def test_inner_rank_and_scales_survive_save_and_reload(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    model = get_defense("muscle-lora", model=tiny_model, scales=[2, 5], inner_rank=2).prepare_model(
        load_model(tiny_model, ["a", "b"]), tok, None)
    _as_if_trained(model)
    before, merged, out = _save_and_reload(model, tok, tmp_path)
    assert torch.allclose(before, merged, atol=1e-5)
    reloaded = load_classifier(out)
    assert torch.equal(reloaded.model.get_base_model().bert.pooler.dense.mslr_kappa, torch.tensor([2.0, 2, 5, 5]))
    assert torch.allclose(before, reloaded.predict_logits(["a fine film", "dull , long and loud movie", "ok"]),
                          atol=1e-5)


def test_head_inner_sets_the_causal_heads_width(tmp_path):
    path = tiny_causal("gpt2", tmp_path / "gpt2")
    model = get_defense("muscle-lora", model=path, head_inner=8).prepare_model(
        load_model(path, ["a", "b"]), load_tokenizer(path), None)
    head = model.get_base_model().score
    assert (head.dense.base_linear.out_features, head.out_proj.in_features) == (8, 8)


def test_reference_batches_use_the_defenses_batch_size_and_max_length(tiny_model, monkeypatch):
    import cleantune.defenses.muscle as muscle

    tok = load_tokenizer(tiny_model)
    d = get_defense("muscle-lora", model=tiny_model, batch_size=5, max_length=12, ref_samples=32)
    model = d.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    (hook,) = d.hooks(model, tok, None, load_benchmark("sst2").dev.subset(range(130)))
    assert max(len(x) for x in encode(tok, hook.refs.texts, 512)) > 12  # truncation is visible
    seen = []
    monkeypatch.setattr(muscle, "make_batch", lambda ids, pad: seen.append(ids) or make_batch(ids, pad))
    params = [p for p in model.parameters() if p.requires_grad]
    hook.reference_gradients(model, params, 0, torch.device("cpu"))
    assert len(seen[0]) == 5 and max(len(x) for x in seen[0]) == 12


def test_references_depend_on_the_seed():
    dev = load_benchmark("sst2").dev.subset(range(130))
    refs0 = split_refs(dev, 32, 0)[0]
    assert split_refs(dev, 32, 0)[0].texts == refs0.texts
    refs1, _ = split_refs(dev, 32, 1)
    assert set(refs1.texts) != set(refs0.texts)


def test_ga_fractions_and_reference_loss_are_per_epoch(tiny_model):
    refs = TextDataset(["good", "bad"], [1, 0], ["a", "b"])
    hook = GradientAlignment(load_tokenizer(tiny_model), refs, batch_size=2, max_length=8, seed=0, min_ref_loss=0.4,
                             min_ref_grad_norm=5e-7, ga_epoch=5, max_raw_grad_ratio=0.1)
    model = _TwoTensors()
    settings = TrainSettings(epochs=10)
    # epoch 0: the reference loss is high (project); epoch 1: low, before ga_epoch (raw)
    for epoch, ref_loss in ((0, 1.0), (1, 0.1)):
        hook.reference_gradients = lambda model, params, step, device, need_grads=None: (ref_loss, [torch.ones(4), torch.ones(3)])
        ctx = StepContext(model, None, epoch=epoch, step=0, steps_per_epoch=2, settings=settings)
        for _ in range(2):
            model.a.grad, model.b.grad = torch.ones(4), torch.ones(3)
            hook.after_backward(ctx)
        hook.on_epoch_end(ctx)
    assert (ctx.logs["ga_project"], ctx.logs["ga_raw"]) == (0.0, 1.0)
    assert ctx.logs["ga_ref_loss"] == pytest.approx(0.1)


def test_fit_selects_on_dev_without_the_references(tiny_model, small_data, monkeypatch):
    import cleantune.defenses.base as base

    train, dev, _ = small_data
    calls, real = [], base.train

    def spy(model, tokenizer, data, dev_data=None, settings=None, hooks=(), *args, **kwargs):
        calls.append((dev_data, settings, hooks))
        return real(model, tokenizer, data, dev_data, settings, hooks, *args, **kwargs)

    monkeypatch.setattr(base, "train", spy)
    get_defense("muscle-lora", model=tiny_model, epochs=1, batch_size=16, ref_samples=32,
                max_length=32).fit(train.subset(range(16)), dev, progress=False)
    ((selection, settings, hooks),) = calls
    assert len(selection) == len(dev) - 32 and not set(selection.texts) & set(hooks[0].refs.texts)
    assert settings.weight_decay == 0.0  # the paper's, not the loop's default 0.01


def test_weight_decay_reaches_the_train_settings(tiny_model):
    tok = load_tokenizer(tiny_model)
    for given, expected in (({}, 0.0), ({"weight_decay": 0.05}, 0.05)):
        d = get_defense("muscle-lora", model=tiny_model, **given)
        d.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
        assert d.train_settings().weight_decay == expected


def test_a_step_the_loss_makes_raw_skips_the_reference_backward_and_changes_nothing(tiny_model, small_data, monkeypatch):
    """Below min_ref_loss (and with no mixing) the gating is raw whatever the norm: the reference backward is
    skipped, and the run is the same to the bit as one that computes it."""
    train, dev, texts = small_data
    grads_taken = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads_taken.append(1) or real_grad(*a, **k))

    def fit():
        d = get_defense("muscle-lora", model=tiny_model, epochs=2, batch_size=16, ref_samples=32, lr=5e-3,
                        min_ref_loss=50.0, max_raw_grad_ratio=0.0)
        clf = d.fit(train, dev, progress=False)
        return d.report_.history, clf.predict_logits(texts)

    skipped_history, skipped_logits = fit()
    assert grads_taken == [] and [h["ga_raw"] for h in skipped_history] == [1.0, 1.0]
    always = GradientAlignment.reference_gradients
    monkeypatch.setattr(GradientAlignment, "reference_gradients",
                        lambda self, model, params, step, device, need_grads=None: always(self, model, params, step,
                                                                                          device))
    history, logits = fit()
    assert len(grads_taken) == 6  # 48 samples / 16, two epochs
    assert history == skipped_history and torch.equal(logits, skipped_logits)


def test_settings_the_backbone_cannot_take_are_refused_before_any_loading(tiny_model, monkeypatch):
    """`run` resolves a cell before it reads data or weights: a module the backbone lacks is refused there, from a
    skeleton; what the skeleton alone cannot do (it has no weights) is left to the run."""
    from cleantune.models import model_skeleton
    from cleantune.runner import RunConfig

    def config(**options):
        return RunConfig(defense="muscle-lora", model=tiny_model, train_size=40, options=options)

    with pytest.raises(UserError, match="MSLR target module 'bert.nope' not found in BertForSequenceClassification"):
        config(mslr_target="bert.nope").resolve()
    with pytest.raises(UserError, match="option target_modules=.'nope'.: Target modules"):
        config(target_modules="nope").resolve()
    skeleton = model_skeleton(tiny_model, 2)
    assert skeleton.bert.pooler.dense.weight.is_meta and skeleton.config.num_labels == 2
    assert config().resolve()["defense"] == "muscle-lora"
    monkeypatch.setattr(MuScleLoRA, "prepare_model", lambda self, model, *a: model.bert.pooler.dense.weight.item())
    assert config(lora_r=4).resolve()["lora_r"] == 4  # .item() on a meta tensor: not the settings' fault


@pytest.mark.parametrize("seed", [2**60, 2**64 - 1, -2**63])
def test_every_seed_training_accepts_draws_reference_batches(tiny_model, seed, monkeypatch):
    """check_seed lets seeds up to 2**64 through; the per-step reference draw must not overflow on them (it raised
    a ValueError at the first step), and a seed that fit before (-5, read modulo 2**64 by torch) keeps its batches."""
    import cleantune.defenses.muscle as muscle
    from cleantune.training import check_seed

    check_seed(seed)
    tok = load_tokenizer(tiny_model)
    refs = TextDataset([f"film number {i}" for i in range(12)], [i % 2 for i in range(12)], ["a", "b"])
    model = load_model(tiny_model, ["a", "b"])
    params = [model.classifier.weight]
    kw = dict(batch_size=4, max_length=16, min_ref_loss=0.0, min_ref_grad_norm=0.0, ga_epoch=0, max_raw_grad_ratio=0.0)
    loss, grads = GradientAlignment(tok, refs, seed=seed, **kw).reference_gradients(model, params, 3, torch.device("cpu"))
    assert math.isfinite(loss) and grads[0].shape == model.classifier.weight.shape
    hook = GradientAlignment(tok, refs, seed=-5, **kw)
    drawn = []
    monkeypatch.setattr(muscle, "make_batch", lambda ids, pad: drawn.append([hook.ids.index(x) for x in ids])
                        or make_batch(ids, pad))
    hook.reference_gradients(model, params, 3, torch.device("cpu"))
    assert drawn == [torch.randperm(12, generator=torch.Generator().manual_seed(-5 * 1_000_003 + 3))[:4].tolist()]


def test_an_ablation_refuses_the_options_of_the_component_it_leaves_out():
    # ga-lora has no MSLR, lora-mslr no GA, ga neither LoRA nor MSLR: their options would be ignored
    for name, option, value in (("ga-lora", "mslr_alpha", 3.0), ("lora-mslr", "ref_samples", 50),
                                ("ga", "lora_r", 4), ("ga", "train_head", True), ("ga", "scales", [1, 2])):
        for make in (lambda **o: get_defense(name, **o), type(get_defense(name))):  # by name, and the class itself
            with pytest.raises(UserError, match=f"defense '{name}' has no .* component: option {option} does not"):
                make(**{option: value})
    with pytest.raises(UserError, match="options: .*ga_epoch") as e:  # the list names only what applies
        get_defense("ga-lora", mslr_alfa=3)
    assert "mslr_alpha" not in str(e.value) and "scales" not in str(e.value)
    # left at their defaults (as `replace` copies them) they pass, and the components' own options stay
    assert get_defense("ga-lora", lora_r=4, ref_samples=50).settings()["lora_r"] == 4
    assert get_defense("lora-mslr", mslr_alpha=3.0).settings()["mslr_alpha"] == 3.0
    assert "mslr_alpha" in get_defense("muscle-lora", mslr_alpha=3.0).settings()


def test_the_defenses_seed_reaches_the_reference_split_and_each_steps_draw(tiny_model, monkeypatch):
    """--seed must pick which dev samples become references (the rest select the epoch) and which reference
    batch each step draws: a seed that stopped at the defense would give every seed of a sweep the same ones."""
    import cleantune.defenses.muscle as muscle

    dev = load_benchmark("sst2").dev.subset(range(130))
    tok = load_tokenizer(tiny_model)
    d = get_defense("muscle-lora", model=tiny_model, seed=7, ref_samples=32, batch_size=4)
    model = d.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    (hook,) = d.hooks(model, tok, None, dev)
    refs, rest = split_refs(dev, 32, 7)
    assert hook.refs.texts == refs.texts and d.selection_data(dev).texts == rest.texts
    assert hook.refs.texts != split_refs(dev, 32, 0)[0].texts  # seed 0's references are others
    drawn = []
    monkeypatch.setattr(muscle, "make_batch", lambda ids, pad: drawn.append([hook.ids.index(x) for x in ids])
                        or make_batch(ids, pad))
    hook.reference_gradients(model, [p for p in model.parameters() if p.requires_grad], 3, torch.device("cpu"))
    # the per-step draw of spec 3.1, seeded by the defense's seed and the step
    expected = torch.randperm(32, generator=torch.Generator().manual_seed(7 * 1_000_003 + 3))[:4].tolist()
    assert drawn == [expected]


def test_gating_options_given_to_the_defense_reach_the_hook(tiny_model):
    """Each of the four gating settings (spec 3.2) given explicitly must replace the published value in the hook,
    not only in `resolved_`: an option silently left at its default would run another experiment."""
    tok = load_tokenizer(tiny_model)
    given = dict(min_ref_grad_norm=1e-4, min_ref_loss=0.2, ga_epoch=3, max_raw_grad_ratio=0.5)
    d = get_defense("muscle-lora", model=tiny_model, **given)
    model = d.prepare_model(load_model(tiny_model, ["a", "b"]), tok, None)
    (hook,) = d.hooks(model, tok, None, load_benchmark("sst2").dev)
    assert hook.gating == given


def test_a_mean_reference_norm_at_min_ref_grad_norm_does_not_project():
    """Spec 3.2: projection needs meanNorm > minRefGradNorm, strictly (as the loss test): at the threshold, and
    with min_ref_grad_norm=0 when every reference gradient is zero, the step is not a projection."""
    plm = dict(min_ref_grad_norm=0.5, min_ref_loss=0.4, ga_epoch=1, max_raw_grad_ratio=0.1)
    assert ga_mode(0.5, 0.9, 0, 10, **plm) == ("raw", 1.0)
    assert ga_mode(0.5, 0.9, 4, 10, **plm) == ("mix", pytest.approx(0.1 * 3 / 9))
    assert ga_mode(0.75, 0.9, 0, 10, **plm) == ("project", 0.0)
    llm = dict(min_ref_grad_norm=0.0, min_ref_loss=0.0, ga_epoch=0, max_raw_grad_ratio=0.0)
    assert ga_mode(0.0, 0.9, 2, 5, **llm) == ("raw", 1.0)
