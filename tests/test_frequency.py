"""The frequency analysis: kernel filtering, relative errors (and the 0/0 fix), the training hook, plots."""

from __future__ import annotations

import math

import torch

from cleantune.data import load_benchmark
from cleantune.defenses import get_defense
from cleantune.frequency import DELTAS, FrequencyHook, kernels, plot, relative_errors
from cleantune.models import load_tokenizer


def test_published_delta_grid_and_kernel_rows():
    assert len(DELTAS) == 25 and DELTAS[0] == 2 and DELTAS[-1] == 8 and DELTAS[12] == 5
    X = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]])
    G, median = kernels(X, [2.0, 8.0])
    assert torch.allclose(G.sum(-1), torch.ones(2, 3))
    # row 0: distances 0, 5, 5 -> weights 1, e^{-5/4}, e^{-5/4} (Laplacian, unsquared distance)
    w = math.exp(-5 / 4)
    assert torch.allclose(G[0, 0], torch.tensor([1, w, w]) / (1 + 2 * w))
    assert median == 5.0
    assert torch.allclose(kernels(X, [2.0], "median")[0][0, 0], torch.tensor([1, math.exp(-1 / 4), math.exp(-1 / 4)]) / (1 + 2 * math.exp(-1 / 4)))


def test_relative_errors_and_the_constant_target_fix():
    torch.manual_seed(0)
    X = torch.randn(6, 3)
    G, _ = kernels(X, [0.5, 2.0])
    P = torch.softmax(torch.randn(6, 2), -1)
    Y = torch.eye(2)[torch.tensor([0, 1, 0, 1, 1, 0])]
    out = relative_errors(G, Y, P)
    k = 1
    GY, GP = G[k] @ Y, G[k] @ P
    assert math.isclose(out["e_low"][k], float((GP - GY).norm(dim=1).mean() / GY.norm(dim=1).mean()), rel_tol=1e-5)
    num = ((P - GP) - (Y - GY)).norm(dim=1).mean()
    assert math.isclose(out["e_high"][k], float(num / (Y - GY).norm(dim=1).mean()), rel_tol=1e-5)
    assert out["e_high_denominator"] == "high part of target"
    # backdoor set: every target equal, so Y - GY = 0 and the published ratio is 0/0
    Yc = torch.eye(2)[torch.ones(6, dtype=torch.long)]
    out = relative_errors(G, Yc, P)
    assert all(math.isfinite(v) for key in ("e_low", "e_high", "lfr", "hfr") for v in out[key])
    assert out["e_high_denominator"] == "target"
    expected = float((P - G[k] @ P).norm(dim=1).mean() / Yc.norm(dim=1).mean())
    assert math.isclose(out["e_high"][k], expected, rel_tol=1e-5)
    # perfect predictions: zero error at every frequency
    assert max(relative_errors(G, Y, Y)["e_low"]) < 1e-6


def test_frequency_hook_records_finite_curves_and_plots(tiny_model, tmp_path):
    b = load_benchmark("sst2")
    train = b.train.stratified_sample(40, 0)
    poison = b.dev.subset(range(20))
    poison.labels = [1] * len(poison)
    hook = FrequencyHook(load_tokenizer(tiny_model), {"clean": lambda: b.dev.subset(range(30)), "poison": poison},
                         every=2, seed=0)
    d = get_defense("finetune", model=tiny_model, epochs=1, batch_size=8, lr=1e-3)
    d.fit(train, b.dev.subset(range(30)), progress=False, extra_hooks=(hook,))
    res = hook.result()
    assert [r["step"] for r in res["records"]] == [0, 2, 4]
    for rec in res["records"]:
        for name in ("clean", "poison"):
            for key in ("e_low", "e_high", "lfr", "hfr"):
                assert len(rec[name][key]) == 25 and all(math.isfinite(v) for v in rec[name][key])
    assert res["records"][0]["poison"]["e_high_denominator"] == "target"
    assert res["records"][0]["poison"]["e_low"] != res["records"][-1]["poison"]["e_low"]  # the model moved
    assert res["sets"]["clean"]["n"] == 30 and res["sets"]["poison"]["median_distance"] > 0
    paths = plot(res, tmp_path, (0,))
    assert [p.name for p in paths] == ["frequency_delta2.00.png"]
    import matplotlib.image

    img = matplotlib.image.imread(paths[0])
    assert img.ndim == 3 and img.shape[0] > 100
