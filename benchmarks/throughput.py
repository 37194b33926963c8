"""Training throughput of the one training loop against this machine's matmul roofline.

Measures, on the same sst2 subset and the default backbone (MiniLM):
  1. the fp32 matmul roofline (GFLOP/s of a large square matmul, best of several),
  2. full fine-tuning with dynamic padding and length-grouped batches (the default),
  3. the same with every batch padded to a fixed 128 tokens, unshuffled by length (the naive baseline),
and prints non-padding tokens/s, samples/s, the speed-up, and model FLOP/s as a share of the roofline
(6 x non-embedding parameters x all tokens incl. padding, the usual estimate for a forward+backward).

    python benchmarks/throughput.py [--samples 640] [--batch-size 32]

On a GPU the roofline is the GPU's fp32 matmul. There MiniLM at batch 32 waits on kernel launches, not
arithmetic, so padding costs next to nothing: one H100 (2026-11-27, --samples 3200) gave 34,669 non-padding
tokens/s with dynamic padding and 35,699 with fixed 128-token padding (0.97x), 4.5 % and 23.4 % of a
50.9 TFLOP/s roofline. The speed-up is a CPU measurement.
"""

from __future__ import annotations

import time

import torch

from common import parser, positive_int, run_script

from cleantune.data import load_benchmark
from cleantune.models import load_model, load_tokenizer
from cleantune.training import TrainSettings, encode, seed_everything, train


def matmul_roofline(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a square matmul on the device the training loop uses (TF32 off, PyTorch's default)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        n = 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def run(data, settings: TrainSettings, model_name: str) -> tuple[float, float, float]:
    seed_everything(0)
    tok = load_tokenizer(model_name)
    model = load_model(model_name, data.label_names)
    report = train(model, tok, data, None, settings, progress=False)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    computed_per_s = report.tokens_per_s * _pad_factor(encode(tok, data.texts, settings.max_length), settings)
    return report.tokens_per_s, report.samples_per_s, 6 * n_params * computed_per_s / 1e9


def _pad_factor(ids, settings: TrainSettings) -> float:
    """All tokens the model computes on (padding included) per non-padding token, for this batching."""
    from cleantune.training import batch_order

    lengths = [len(x) for x in ids]
    total = 0
    for b in batch_order(lengths, settings.batch_size, settings.seed, 0, settings.group_by_length):
        total += len(b) * max(settings.pad_to_length or 0, max(lengths[i] for i in b))
    return total / sum(lengths)


def main():
    ap = parser(__doc__)
    ap.add_argument("--samples", type=positive_int, default=640)
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--model", default="minilm")
    args = ap.parse_args()

    data = load_benchmark("sst2").train.stratified_sample(args.samples, 0)
    roof = matmul_roofline()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"machine: {device}, fp32 matmul roofline {roof:.1f} GFLOP/s")
    base = dict(epochs=1, batch_size=args.batch_size, max_length=128, warmup_ratio=0.0)
    rows = []
    for label, extra in (("dynamic padding, length-grouped", {}),
                         ("fixed 128-token padding", {"pad_to_length": 128, "group_by_length": False})):
        settings = TrainSettings(**base, **extra)
        tps, sps, gflops = run(data, settings, args.model)
        rows.append((label, tps, sps, gflops))
    print(f"{'batching':34} {'tokens/s':>10} {'samples/s':>10} {'model GFLOP/s':>14} {'% roofline':>10}")
    for label, tps, sps, gflops in rows:
        print(f"{label:34} {tps:10.0f} {sps:10.1f} {gflops:14.1f} {100 * gflops / roof:9.1f}%")
    print(f"speed-up of dynamic padding (non-padding tokens/s): {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    run_script(main)
