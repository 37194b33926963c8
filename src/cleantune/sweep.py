"""Sweeps: the cross product of a grid file, run in worker processes or as Ray tasks, resumable.

A grid file is YAML (or TOML) whose keys are run options (`RunConfig` field names, as in `cleantune run`).
A list value is an axis: every value runs. `dataset`, `attack` and `defense` items may carry their own
settings as a one-key mapping, e.g. `{badnets: {mode: clean, triggers: [cf, mn, bb, tq]}}`. `triggers` is a
list by nature, so a list of words is one value and a list of lists is an axis; likewise `options` is one
mapping, or a list of mappings as an axis.

Resuming needs no state of its own: a run's id is the hash of its full resolved config, the store is
asked which ids are stored ok, and only the others run (with per-run checkpoints, so a run killed
mid-training continues from its last finished epoch). A failed run is stored with status 'failed' and its
traceback; the next sweep retries it.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import UserError
from .options import C_INT_MAX
from .runner import ATTACK_OPTIONS, RunConfig, environment, run
from .store import ResultStore, config_hash, default_store_path

NAMED_AXES = ("dataset", "attack", "defense")


@dataclass
class Cell:
    config: RunConfig
    id: str
    resolved: dict


def load_grid(path: str | Path) -> list[Cell]:
    """Read a grid file and expand it into checked cells (every cell resolves before anything runs)."""
    from .cli import load_config_file

    return expand_grid(load_config_file(str(path), label=f"grid {path}"), f"grid {path}")


def _is_axis(key: str, value) -> bool:
    if not isinstance(value, list):
        return False
    if key == "triggers":
        return all(isinstance(v, list) for v in value)
    return True


def _named_items(key: str, value, source: str, known: set[str]) -> list[dict]:
    """`dataset`/`attack`/`defense` values: names, or one-key mappings of a name to its own settings."""
    items = []
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, dict):
            if len(v) != 1:
                raise UserError(f"{source}: each '{key}' entry is a name or a one-key mapping name: {{settings}}")
            (name, settings), = v.items()
            settings = settings or {}
            if not isinstance(settings, dict):
                raise UserError(f"{source}: the settings of {key} '{name}' must be a mapping")
            cell = {}
            for k, s in settings.items():
                kk = str(k).replace("-", "_")
                if kk not in known or kk in NAMED_AXES:
                    raise UserError(f"{source}: unknown key '{k}' in the settings of {key} '{name}'")
                cell[kk] = s
            items.append({**cell, key: str(name)})
        else:
            items.append({key: str(v)})
    if not items:
        raise UserError(f"{source}: '{key}' lists no value")
    return items


def expand_grid(data: dict, source: str = "grid") -> list[Cell]:
    known = {f.name for f in fields(RunConfig)}
    if not data:  # else it would run the default cell, a full sst2 training, without a word
        raise UserError(f"{source}: the grid is empty (keys are run options: {', '.join(sorted(known))})")
    fixed: dict = {}
    axes: dict[str, list[dict]] = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise UserError(f"{source}: unknown key '{k}' (keys are run options: {', '.join(sorted(known))})")
        if key in NAMED_AXES:
            axes[key] = _named_items(key, v, source, known)
        elif _is_axis(key, v):
            if not v:
                raise UserError(f"{source}: '{k}' lists no value")
            axes[key] = [{key: x} for x in v]
        else:
            fixed[key] = v
    for key in NAMED_AXES:
        axes.setdefault(key, [{key: getattr(RunConfig, key)}])
    attacks = [item["attack"] for item in axes["attack"]]
    for item in axes["attack"]:  # in the grid's words, before RunConfig words it as command-line flags
        for opt, fits in ATTACK_OPTIONS.items():
            if opt in item and item["attack"] not in fits:
                raise UserError(f"{source}: '{opt}' in the settings of attack '{item['attack']}' applies to "
                                f"attack {' or '.join(fits)} only")
    for opt, fits in ATTACK_OPTIONS.items():
        values = [fixed[opt]] if opt in fixed else [item[opt] for item in axes.get(opt, [])]
        # dropped below for the attacks it does not fit; fitting none it would vanish from every cell
        if any(v is not None for v in values) and not set(fits) & set(attacks):
            raise UserError(f"{source}: '{opt}' applies to attack {' or '.join(fits)} only; "
                            f"the grid's attacks are {', '.join(dict.fromkeys(attacks))}")
    # seeds vary fastest, so a sweep finishes every seed of a cell together; named settings are the most
    # specific, so they are applied after every other axis, the seed's too (`lora: {seed: 5}` runs seed 5)
    order = [a for a in axes if a not in NAMED_AXES and a != "seed"] + list(NAMED_AXES) + (["seed"] if "seed" in axes else [])
    applied = [a for a in order if a not in NAMED_AXES] + list(NAMED_AXES)
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in itertools.product(*(axes[a] for a in order)):
        parts = dict(zip(order, combo))
        cell = dict(fixed)
        for a in applied:
            if a == NAMED_AXES[0]:  # grid-wide attack options go to the attacks they fit; named ones are checked
                for opt, attacks in ATTACK_OPTIONS.items():
                    if opt in cell and parts["attack"]["attack"] not in attacks:
                        del cell[opt]
            for k, v in parts[a].items():
                cell[k] = {**cell.get(k, {}), **v} if k == "options" and isinstance(v, dict) else v
        try:
            config = RunConfig(**cell)
            resolved = config.resolve()
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad value ({e})") from None
        run_id = config_hash(resolved)
        if run_id not in seen:  # two spellings of one config run once
            seen.add(run_id)
            cells.append(Cell(config, run_id, resolved))
    return cells


# ---------------------------------------------------------------- one cell, in whatever process runs it


def run_cell(cell: Cell, store_path: str | None, threads: int | None = None) -> dict:
    """Run one cell and return its record. With a store path the record is written here (local workers);
    without, the caller writes it (Ray: the driver owns the store). Errors become a 'failed' record."""
    import torch

    from .training import flush_subnormals

    flush_subnormals()  # a Ray worker enters here first (local workers already did, in _init_worker)
    if threads:
        torch.set_num_threads(threads)
    store = ResultStore(store_path) if store_path is not None else None
    t0 = time.perf_counter()
    try:
        r = run(cell.config, store, resume=True, progress=False)  # a finished run removes its checkpoints
        # reused: another process stored the cell while this one waited for its lock
        return {k: r[k] for k in ("id", "config", "status", "metrics", "timings", "env", "error", "reused")}
    except Exception as e:  # one cell's failure is recorded and the sweep goes on
        # the id planned when the grid was checked: resolving again reads the data, which may be what failed
        record = {"id": cell.id, "config": cell.resolved, "status": "failed", "metrics": {},
                  "timings": {"wall_s": time.perf_counter() - t0}, "env": environment(),
                  "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}", "reused": False}
        if store is not None:
            put_record(store, record)
        return record
    finally:
        # closed here, not when the traceback lets go of it: an interrupted sweep that stored nothing removes
        # its new store only where no connection has it open (ResultStore.discard_if_empty)
        if store is not None:
            store.conn.close()


def put_record(store: ResultStore, r: dict) -> None:
    store.put(r["id"], r["config"], r["metrics"], r["timings"], r["env"], status=r["status"], error=r["error"])


def _warm_up() -> None:
    """Import what training imports lazily, so the first run's wall time is not charged with it (the
    report compares wall times between defenses)."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401


def _init_worker(threads: int) -> None:
    # Ctrl-C reaches the whole process group. A worker interrupted mid-cell would hand the interruption back
    # as that cell's result and take the next queued cell before the sweep terminates it: only the sweep
    # process handles Ctrl-C, and it stops the workers (_local)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A sweep killed outright (SIGKILL, the out-of-memory killer) cannot stop its workers: each would train its
    # cell to the end and then wait on the dead pool for good. They stop when their sweep is gone instead.
    threading.Thread(target=_exit_without, args=(os.getppid(),), daemon=True).start()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tqdm's default lock holds a multiprocessing semaphore, which a worker stopped by Ctrl-C never releases: the
    # resource tracker warned of "leaked semaphore objects" as the sweep exited. A worker's bars are its own.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    import torch

    from .models import silence_transformers
    from .training import flush_subnormals

    flush_subnormals()  # before the first parallel op, so every intra-op thread inherits it
    torch.set_num_threads(threads)
    silence_transformers()  # as the CLI that started the sweep: the workers print into its output
    _warm_up()


def _exit_without(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)  # a cell cut short resumes from its last checkpoint in the next sweep


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- backends: each yields records as runs end


def _local(cells: list[Cell], store_path: str, workers: int, threads: int) -> Iterator[dict]:
    if workers == 1:  # in this process: no start-up cost, and a debugger works
        _warm_up()
        for c in cells:
            yield run_cell(c, store_path, threads)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,))
    futures = [pool.submit(run_cell, c, store_path, threads) for c in cells]
    finished = False
    try:
        for f in as_completed(futures):
            yield f.result()
        finished = True
    except BrokenProcessPool:
        raise UserError("a sweep worker process died (out of memory?); finished runs are stored: "
                        "run the same sweep again to continue") from None
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            # Ctrl-C or an error: the pool has already handed a queued cell to a worker, which cancel()
            # cannot take back, and a plain shutdown would wait for it to train in full. The workers stop
            # now instead; a cell cut short resumes from its last checkpoint in the next sweep.
            workers_now = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in workers_now:
                p.terminate()
            # A worker that outlives SIGTERM (code in its cell that handles it) would be waited for at exit by
            # the pool's own thread, for as long as its cell trains: it gets SIGKILL after a grace period
            grace = time.monotonic() + 10
            for p in workers_now:
                p.join(timeout=max(0.0, grace - time.monotonic()))
            for p in workers_now:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=10)


def _ray(cells: list[Cell], store: ResultStore, address: str | None, cpus: int, gpus: float) -> Iterator[dict]:
    ray = _require_ray()
    # A local instance's workers see this machine's paths: PYTHONPATH travels so that they import the same
    # cleantune as this driver (a source checkout). A cluster's nodes have their own install and paths.
    env = {k: os.environ[k] for k in ("PYTHONPATH", "CLEANTUNE_DATA", "HF_HUB_OFFLINE")
           if k in os.environ and address in (None, "local")}
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # part of a run's id: every worker trains what was planned
        env["ACCELERATE_MIXED_PRECISION"] = os.environ["ACCELERATE_MIXED_PRECISION"]
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    task = ray.remote(run_cell).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    pending = {task.remote(c, None, cpus): c for c in cells}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(done[0])
        try:
            record = ray.get(done[0])
        except Exception as e:  # the task's process died: record it like any failure
            record = {"id": cell.id, "config": cell.resolved, "status": "failed", "metrics": {}, "timings": {},
                      "env": {}, "error": f"Ray task failed: {type(e).__name__}: {e}"}
        put_record(store, record)  # the driver writes: SQLite WAL does not work across machines
        yield record


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepSummary:
    cells: list[Cell]
    skipped: int   # stored ok before this sweep, or by another process while this one waited for the cell
    ran: int
    failed: list[dict]
    seconds: float


def _require_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'cleantune[ray]'") from None
    return ray


def check_options(workers: int = 1, backend: str = "local", address: str | None = None,
                  cpus_per_run: int | None = None, gpus_per_run: float = 0) -> None:
    """The sweep's own options; an option the backend would ignore is an error, not a silent no-op."""
    if backend not in ("local", "ray"):
        raise UserError(f"--backend must be local or ray, got '{backend}'")
    for name, value in (("--workers", workers), ("--cpus-per-run", cpus_per_run)):
        if value is None and name == "--cpus-per-run":  # unset: cores // workers
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
        if value > C_INT_MAX:  # a process count and a thread count: C ints underneath
            raise UserError(f"{name} must be at most {C_INT_MAX}, got {value}")
    if isinstance(gpus_per_run, bool) or not isinstance(gpus_per_run, (int, float)) \
            or not math.isfinite(gpus_per_run) or gpus_per_run < 0:
        raise UserError(f"--gpus-per-run must be a number of GPUs, 0 or more, got {gpus_per_run}")
    if backend == "local":
        for name, given in (("--address", address is not None), ("--gpus-per-run", gpus_per_run != 0)):
            if given:
                raise UserError(f"{name} applies to --backend ray only")
    elif workers != 1:  # Ray runs as many tasks at once as the cluster's free CPUs and GPUs allow
        raise UserError("--workers applies to --backend local only (with Ray, --cpus-per-run and "
                        "--gpus-per-run decide how many runs fit at once)")
    elif importlib.util.find_spec("ray") is None:  # found, not imported: --dry-run refuses what the sweep would
        _require_ray()


def sweep(cells: list[Cell], store_path: str | Path | None = None, workers: int = 1, backend: str = "local",
          address: str | None = None, cpus_per_run: int | None = None, gpus_per_run: float = 0,
          progress: bool = True) -> SweepSummary:
    from tqdm.auto import tqdm

    # every check before the store is opened: opening it creates the file
    check_options(workers, backend, address, cpus_per_run, gpus_per_run)
    if backend == "ray":
        _require_ray()
    new_store = not Path(store_path or default_store_path()).exists()
    store = ResultStore(store_path)
    stored = store.stored_ids()
    pending = [c for c in cells if c.id not in stored]
    t0 = time.perf_counter()
    failed: list[dict] = []
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc="sweep", unit="run", dynamic_ncols=True,
               disable=not progress, file=sys.stderr)
    if backend == "local":
        threads = cpus_per_run or max(1, cpu_count() // workers)
        records = _local(pending, str(store.path), workers, threads)
    else:
        records = _ray(pending, store, address, cpus_per_run or 1, gpus_per_run)
    try:
        reused = _collect(records, bar, failed)
    except BaseException:  # Ctrl-C before any cell finished: no empty store left, as `run` leaves none
        if new_store:
            store.discard_if_empty()
        raise
    return SweepSummary(cells, len(cells) - len(pending) + reused, len(pending) - reused, failed,
                        time.perf_counter() - t0)


def _collect(records: Iterator[dict], bar, failed: list[dict]) -> int:
    """Follow the records as they finish; the number of cells another process stored while this one waited."""
    reused = 0
    try:
        for r in records:
            reused += bool(r.get("reused"))
            c = r["config"]
            if r["status"] == "failed":
                failed.append(r)
                bar.write(f"FAILED {c['dataset']} {c['attack']} {c['defense']} seed={c['seed']}: "
                          f"{r['error'].splitlines()[0]}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix_str(f"last: {c['dataset']}/{c['attack']}/{c['defense']}/s{c['seed']}"
                                + (f", failed {len(failed)}" if failed else ""))
    finally:
        # now, not when the generator is collected: an interrupt raised here, outside it, keeps it alive in the
        # traceback, and its workers would run on (and the pool's exit handler wait for them)
        records.close()
        bar.close()
    return reused
