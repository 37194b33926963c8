"""`accelerate launch` with two CPU processes runs the same training loop (DDP over gloo).

On a machine without CUDA, `--multi_gpu --num_processes N` starts N processes (torchrun) and the loop's
Accelerator(cpu=True) joins them over gloo; `--cpu` alone would start a single process."""

import subprocess
import sys


def test_two_process_launch_trains_and_evaluates(tiny_model, tmp_path):
    store = tmp_path / "s.sqlite"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cleantune", "run", "--model", tiny_model,
           "--train-size", "128", "--epochs", "1", "--store", str(store), "--no-progress", "--format", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from cleantune.store import ResultStore

    runs = ResultStore(store).runs()
    assert len(runs) == 1  # written once, by the main process
    assert runs[0]["timings"]["processes"] == 2
    assert 0 <= runs[0]["metrics"]["cacc"] <= 1 and 0 <= runs[0]["metrics"]["asr"] <= 1
    # each process took half of the batches: 128 samples / batch 32 = 4 batches -> 2 steps per process
    assert runs[0]["metrics"]["history"][0]["steps"] == 2
