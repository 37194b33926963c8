"""`accelerate launch` with two CPU processes runs the same training loop (DDP over gloo), on a GPU machine too.

On a machine without CUDA, `--multi_gpu --num_processes N` starts N processes (torchrun) and the loop's
Accelerator(cpu=True) joins them over gloo; `--cpu` alone would start a single process."""

import json
import os
import subprocess
import sys
import time


# port 0: accelerate picks a free port. Its default, 29500, is checked and then bound, so two launches at
# once (another test run, a user's job) could both find it free and one would fail its rendezvous.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]


def cpu_only() -> dict[str, str]:
    """The launch's environment, read when a test runs (so the test's own XDG folders are in it), with two
    CPU processes on any machine: on one with a single GPU, the second process would ask for cuda:1."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_two_process_launch_trains_and_evaluates(tiny_model, tmp_path):
    store = tmp_path / "s.sqlite"
    cmd = LAUNCH + ["-m", "cleantune", "run", "--model", tiny_model, "--train-size", "128", "--epochs", "1",
                    "--store", str(store), "--no-progress", "--format", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cpu_only())
    assert p.returncode == 0, p.stderr[-2000:]
    printed = json.loads(p.stdout)  # one process prints: two would make this two arrays
    assert len(printed) == 1 and printed[0]["config"]["processes"] == 2  # another effective batch, another run
    from cleantune.store import ResultStore

    runs = ResultStore(store).runs()
    assert len(runs) == 1  # written once, by the main process
    assert runs[0]["timings"]["processes"] == 2
    # each process scored half of the test sets, and the metrics count them whole: sst2's 1,821 clean and 912
    # triggered samples (a count over one half would not be a whole number of either)
    m = runs[0]["metrics"]
    assert m["n_triggered_test"] == 912
    assert abs(m["cacc"] * 1821 - round(m["cacc"] * 1821)) < 1e-6 and abs(m["asr"] * 912 - round(m["asr"] * 912)) < 1e-6
    # each process took half of the batches: 128 samples / batch 32 = 4 batches -> 2 steps per process
    assert runs[0]["metrics"]["history"][0]["steps"] == 2


LOCKER = """
import os, sys, time
import torch
from pathlib import Path
from accelerate import PartialState
from cleantune.training import Busy, work_lock

def say(*words):  # one write per line: two processes print into one pipe, and print's pieces interleaved
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())


work = Path(sys.argv[1])
state = PartialState(cpu=True)
try:
    with work_lock(work, wait=False):
        say("unlocked")
except Busy:
    say("busy")
if state.is_main_process:
    (work.parent / "ready").touch()
with work_lock(work, wait=True):
    say("got", time.time())
torch.distributed.destroy_process_group()  # as cleantune's CLI does on exit: else gloo may abort the exit
"""


def test_a_launch_waits_for_another_process_on_its_run_folder(tmp_path):
    """Two launches of one cell would write one checkpoint folder at once: the main process locks for all."""
    from cleantune.training import work_lock

    script = tmp_path / "locker.py"
    script.write_text(LOCKER)
    work = tmp_path / "w"
    with work_lock(work, wait=False):
        p = subprocess.Popen(LAUNCH + [str(script), str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=cpu_only())
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)
        assert p.poll() is None, p.stderr.read()[-2000:]  # still waiting
        released = time.time()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    lines = out.split()
    assert lines.count("busy") == 2 and "unlocked" not in lines  # without waiting, both processes give up
    got = [float(t) for k, t in zip(lines, lines[1:]) if k == "got"]
    assert len(got) == 2 and min(got) >= released


REPLICAS = """
import os, sys, torch
from pathlib import Path
from accelerate import PartialState
from cleantune.data import TextDataset
from cleantune.defenses.abl import LocalGradientAscent
from cleantune.defenses.muscle import GradientAlignment
from cleantune.models import load_model, load_tokenizer
from cleantune.training import StepHook, TrainSettings, seed_everything, train

model_dir, out = sys.argv[1], Path(sys.argv[2])
state = PartialState(cpu=True)
words = "good bad movie film great awful plot actor story fun boring nice".split()
# lengths vary, so the processes' batches have other shapes, draw other dropout masks, and their random
# states part from the first step
data = TextDataset([" ".join(words[(i * k) % 12] for k in range(1, 2 + i % 7)) for i in range(64)],
                   [i % 2 for i in range(64)], ["neg", "pos"])
refs = TextDataset(data.texts[:16], data.labels[:16], ["neg", "pos"])
tok = load_tokenizer(model_dir)


class Stop(Exception):
    pass


class StopInSecondEpoch(StepHook):
    def on_epoch_end(self, ctx):
        if ctx.epoch == 1:
            raise Stop


def run(hooks, epochs=1, folder=None, resume=False):
    seed_everything(0)
    model = load_model(model_dir, ["neg", "pos"])
    global history
    history = train(model, tok, data, None, TrainSettings(epochs=epochs, batch_size=8, lr=1e-3), hooks, folder,
                    resume, progress=False).history
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def report(check, w, reference=None):
    every = [torch.zeros_like(w) for _ in range(state.num_processes)]
    torch.distributed.all_gather(every, w)
    same = all(torch.equal(every[0], x) for x in every[1:]) and (reference is None or torch.equal(reference, w))
    if state.is_main_process:
        print(check, same, flush=True)


# each process draws its own dropout: hooks that decide on the step's loss or a reference gradient must
# decide alike everywhere, or the replicas drift apart
ga = GradientAlignment(tok, refs, batch_size=8, max_length=32, seed=0, min_ref_loss=0.4, min_ref_grad_norm=5e-7,
                       ga_epoch=0, max_raw_grad_ratio=0.1)
report("ga", run((ga,)))
report("lga", run((LocalGradientAscent(0.6931),)))
report("loss", torch.tensor([h["loss"] for h in history], dtype=torch.float64))  # the mean over processes
whole = run((), epochs=3, folder=out / "a")
try:
    run((StopInSecondEpoch(),), epochs=3, folder=out / "b")
except Stop:
    pass
resumed = run((), epochs=3, folder=out / "b", resume=True)
report("resume", resumed, whole)  # the main process's comparison stands for both: the replicas are equal
torch.distributed.destroy_process_group()
# Three times in about 50 runs (2026-11-29) rank 0 aborted after all four checks had printed, at interpreter
# exit: "terminate called without an active exception". A core dump showed why: the group above is destroyed,
# but the gloo backend lives on (its worker threads too) while other objects hold it, and one worker was still
# releasing the last all_gather's work when the interpreter began to finalize. Releasing it frees tensors
# Python had created, which takes the GIL; a thread that asks for the GIL during finalization is ended with
# pthread_exit, whose unwinding through a noexcept destructor calls std::terminate (PyTorch issue 190489).
# The race needs a collective of Python-made tensors right before the exit, as `report` is here: what this test
# checks is done by then, so it leaves without the teardown. (The CLI's launches keep the normal exit: none of
# the suite's launches through main has been seen to abort, nor 60 launches of `cleantune eval` in a row, whose
# scores are gathered with all_gather_object right before their output and exit.)
sys.stdout.flush()
os._exit(0)
"""


def test_replicas_stay_identical_under_hooks_and_resume(tiny_model, tmp_path):
    script = tmp_path / "replicas.py"
    script.write_text(REPLICAS)
    p = subprocess.run(LAUNCH + [str(script), tiny_model, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=cpu_only())
    # the checks it passed (stdout) and the start of stderr say where a failing launch stopped
    assert p.returncode == 0, f"stdout: {p.stdout!r}\nstderr, start: {p.stderr[:3000]}\nstderr, end: {p.stderr[-1500:]}"
    assert p.stdout.split("\n")[:4] == ["ga True", "lga True", "loss True", "resume True"], p.stdout


FULL_DISK = """
import errno, sys
from cleantune import training
from cleantune.cli import main

real, calls = training._save_checkpoint, []

def second_fails(*args, **kwargs):  # only the main process writes checkpoints
    calls.append(1)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)

training._save_checkpoint = second_fails
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_the_main_process_cannot_write_stops_every_process_with_its_message(tiny_model, tmp_path):
    """Before, the main process raised alone and the other failed in the epoch's barrier with gloo's traceback
    ("Connection closed by peer"), burying the one line that says what to do."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    p = subprocess.run(LAUNCH + [str(script), "run", "--model", tiny_model, "--train-size", "128", "--epochs", "3",
                                 "--store", str(tmp_path / "s.sqlite"), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=cpu_only())
    assert p.returncode != 0
    lines = p.stderr.splitlines()
    said = [l for l in lines if l.startswith("cleantune: error: cannot write epoch 1's checkpoint")]
    assert len(said) == 2, p.stderr[-3000:]  # each process, each on its own line
    assert "(No space left on device)" in said[0] and said[0].endswith("the same command with --resume")
    assert "Connection closed by peer" not in p.stderr and "[rank1]" not in p.stderr, p.stderr[-3000:]
    assert lines.count(said[0]) == 2 and "exitcode  : 2" in p.stderr  # both processes left with status 2


PEER = """
import sys
import torch
from accelerate import PartialState
from cleantune import cli
from cleantune.errors import UserError

def main_alone_fails(ns):
    if PartialState(cpu=True).is_main_process:
        raise UserError("the main process failed alone")
    torch.distributed.barrier()
    return 0

cli.COMMANDS["scan"] = main_alone_fails  # (not `results`: its other processes leave at once, under a launch)
sys.exit(cli.main(["scan", "data.tsv"]))
"""


def test_a_process_whose_peer_failed_says_so_in_one_line(tmp_path):
    """Any error of one process leaves the others failing in their next collective: they say where the
    cause is, not gloo's traceback."""
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    p = subprocess.run(LAUNCH + [str(script)], capture_output=True, text=True, timeout=300, env=cpu_only())
    assert p.returncode != 0
    lines = p.stderr.splitlines()
    assert "cleantune: error: the main process failed alone" in lines
    assert ("cleantune: error: another process of this launch stopped (its message is above), so this one "
            "stopped too") in lines, p.stderr[-3000:]
    assert "Connection closed by peer" not in p.stderr and "[rank1]" not in p.stderr, p.stderr[-3000:]


COMMANDS = """
import sys, warnings
import torch
from cleantune import cli

model, data, out = sys.argv[1:]
# each command as main() runs it, but without main's exit, which ends the process group the next one needs
for argv in (["eval", model, data, "--no-progress"],
             ["scan", data, "--model", model, "--batch-size", "8", "--no-progress"],
             ["analyze", "frequency", "--model", model, "--train-size", "64", "--epochs", "1", "--samples", "8",
              "--every", "100", "--out", out, "--no-progress"]):
    ns = cli.build_parser().parse_args(argv)
    assert cli.COMMANDS[ns.command](ns) == 0
    sys.stdout.flush()
warnings.showwarning = cli._show_warning  # as main() sets it
warnings.warn("a library's warning")  # (UMAP's and scikit-learn's, from CUBE)
torch.distributed.destroy_process_group()
"""


def test_eval_scan_analyze_and_warnings_come_out_once(tiny_model, tmp_path):
    """Before, every process of the launch printed eval's, scan's and analyze's output (and both wrote analyze's
    curves.json and plots into one folder at once), and each warning: each line came out twice. scan counted its
    steps per pass as one process takes them."""
    script = tmp_path / "commands.py"
    script.write_text(COMMANDS)
    data = tmp_path / "d.tsv"
    words = "good bad movie film great awful plot actor story fun boring nice".split()
    data.write_text("sentence\tlabel\n" + "".join(f"{words[i % 12]} {words[(i * 5) % 12]} cf{i % 3}\t{i % 2}\n"
                                                  for i in range(32)))
    p = subprocess.run(LAUNCH + [str(script), tiny_model, str(data), str(tmp_path / "freq")],
                       capture_output=True, text=True, timeout=300, env=cpu_only())
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert sum(l.startswith("n=32  accuracy=") for l in lines) == 1, p.stdout  # eval
    # scan's closing line, with the steps a pass takes: 32 samples / batch 8 = 4 batches -> 2 per process (it said 4)
    assert sum(l.startswith("32 samples; passes AB, batch 8 per process x 2, 2 optimizer step(s) per pass (too few")
               for l in lines) == 1, p.stdout
    assert sum(l.startswith("curves: ") for l in lines) == 1, p.stdout  # analyze
    assert (tmp_path / "freq" / "curves.json").is_file()
    assert p.stderr.count("UserWarning: a library's warning") == 1, p.stderr[-3000:]


SHARES = """
import json, os, sys
from types import SimpleNamespace
from accelerate import PartialState
from cleantune.data import TextDataset
from cleantune.evaluate import evaluate
from cleantune.runner import detection

state = PartialState(cpu=True)
predicted, flagged = [], []


class Counting:  # a bare predictor with a detector: each records the texts it was given
    def predict(self, texts):
        predicted.extend(texts)
        return [len(t) % 2 for t in texts]

    def flag(self, texts):
        flagged.extend(texts)
        return ["cf" in t for t in texts]


clean, triggered = (TextDataset(json.loads(a), json.loads(b), ["neg", "pos"]) for a, b in zip(sys.argv[1::2], sys.argv[2::2]))
model = Counting()
metrics = evaluate(model, clean, triggered, shard=True)
found = detection(SimpleNamespace(), model, SimpleNamespace(clean_test=clean, triggered_test=triggered))
os.write(1, (json.dumps({"rank": state.process_index, "metrics": metrics, "detection": found,
                         "predicted": predicted, "flagged": flagged}) + "\\n").encode())
# the last collective (detection's all_gather_object) is right before the exit: rank 0 aborted once at
# interpreter exit in CI (2026-11-29), the PyTorch race the replicas script's comment explains
os._exit(0)
"""


def test_a_launch_scores_the_test_sets_in_shares_and_every_process_gets_the_whole_metrics(tmp_path):
    """Before, every process of a launch scored the whole test sets (ONION's LM on a full test split took each
    process as long as one process alone). The triggered set of one text leaves the second process no share."""
    from types import SimpleNamespace

    from cleantune.data import TextDataset
    from cleantune.evaluate import evaluate
    from cleantune.runner import detection

    texts = ["a good film", "bad", "a dull plot cf", "great fun", "awful", "nice actor", "a story", "boring cf",
             "fun", "the film", "no"]
    labels = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0]
    trig_texts, trig_labels = ["cf a bad plot"], [1]
    script = tmp_path / "shares.py"
    script.write_text(SHARES)
    p = subprocess.run(LAUNCH + [str(script), json.dumps(texts), json.dumps(labels), json.dumps(trig_texts),
                                 json.dumps(trig_labels)], capture_output=True, text=True, timeout=300, env=cpu_only())
    assert p.returncode == 0, p.stderr[-3000:]
    out = sorted((json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")), key=lambda r: r["rank"])
    assert [r["rank"] for r in out] == [0, 1]
    # contiguous shares, in rank order, each text scored once
    assert out[0]["predicted"] == texts[:6] + trig_texts and out[1]["predicted"] == texts[6:]
    assert out[0]["flagged"] == texts[:6] + trig_texts and out[1]["flagged"] == texts[6:]

    class Counting:
        def predict(self, texts):
            return [len(t) % 2 for t in texts]

        def flag(self, texts):
            return ["cf" in t for t in texts]

    clean, triggered = TextDataset(texts, labels, ["neg", "pos"]), TextDataset(trig_texts, trig_labels, ["neg", "pos"])
    alone = evaluate(Counting(), clean, triggered)
    found = detection(SimpleNamespace(), Counting(), SimpleNamespace(clean_test=clean, triggered_test=triggered))
    for r in out:  # the metrics of the whole sets, as one process finds them
        assert r["metrics"] == alone and r["detection"] == found


STORE_COMMANDS = """
import os, sys
from cleantune import cli

store, out, grid = sys.argv[1:]
rank = os.environ["RANK"]
for argv in (["results", "--store", store, "--format", "json"], ["report", "--store", store, "--out", out],
             ["sweep", grid, "--store", store + ".sweep", "--no-progress"]):
    code = cli.main(argv)
    sys.stdout.flush()
    os.write(1, f"rank {rank} {argv[0]} exit {code}\\n".encode())
"""


def test_results_and_report_come_out_once_and_a_sweep_is_refused_under_a_launch(tiny_model, tmp_path):
    """Before, every process printed `results`, both wrote one report folder at once, and each process ran the whole
    grid in a worker pool of its own (the table printed twice, with different rows)."""
    from cleantune.store import ResultStore

    store = tmp_path / "s.sqlite"
    ResultStore(store).put("a" * 64, {"dataset": "sst2", "attack": "badnets", "defense": "finetune", "seed": 0},
                           {"cacc": 0.8, "asr": 0.9}, {"wall_s": 1.0}, {})
    grid = tmp_path / "g.yaml"
    grid.write_text(f"dataset: sst2\nattack: badnets\ndefense: finetune\nmodel: {tiny_model}\ntrain_size: 64\n")
    script = tmp_path / "store_commands.py"
    script.write_text(STORE_COMMANDS)
    p = subprocess.run(LAUNCH + [str(script), str(store), str(tmp_path / "report"), str(grid)], capture_output=True,
                       text=True, timeout=300, env=cpu_only())
    lines = p.stdout.splitlines()
    for rank in (0, 1):
        assert f"rank {rank} results exit 0" in lines and f"rank {rank} report exit 0" in lines, p.stdout
        assert f"rank {rank} sweep exit 2" in lines, p.stdout
    printed = "\n".join(l for l in lines if not l.startswith(("rank ", "wrote ")))
    assert len(json.loads(printed)) == 1  # one process's list of the one run: two would not parse
    assert sum(l.startswith("wrote ") for l in lines) == 1 and (tmp_path / "report" / "report.md").is_file()
    assert p.stderr.count("cleantune: error: cleantune sweep runs its cells in processes of its own") == 2
    assert not list(tmp_path.glob("s.sqlite.sweep*"))  # refused before the store or any cell
