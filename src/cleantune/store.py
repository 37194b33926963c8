"""SQLite results store: one row per run, keyed by a hash of the full resolved run config."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from pathlib import Path

from .errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    status TEXT NOT NULL,          -- 'ok' or 'failed'
    metrics TEXT NOT NULL,
    timings TEXT NOT NULL,
    env TEXT NOT NULL,
    error TEXT,
    created REAL NOT NULL
)
"""


COLUMNS = ["id", "config", "status", "metrics", "timings", "env", "error", "created"]

# The store's format, in SQLite's user_version: a later cleantune that changes the table or what its JSON columns
# hold raises it, and this one then refuses the file instead of misreading its runs. Stores written before the
# stamp read 0 and hold this format; a writer stamps them.
STORE_FORMAT = 1


# what `results` and `report` select runs by: the axes of `run` (the same names) and the run's status
RUN_FILTERS = ("dataset", "attack", "defense", "model", "seed", "status")


def _value(r: dict, key: str) -> str:
    return str(r["status"] if key == "status" else r["config"].get(key))


def matches(r: dict, where: dict[str, list[str]]) -> bool:
    """Whether run `r` takes one of the given values on every key of `where` (RUN_FILTERS; values as text)."""
    return all(_value(r, k) in wanted for k, wanted in where.items())


STATUSES = ("ok", "failed")


def select_runs(runs: list[dict], where: dict[str, list[str]], store: str | Path) -> list[dict]:
    """The runs that match `where`. A value that no run in the store takes is refused, naming what is there: a
    typo would otherwise read as no result. A status is known in advance: `--status failed` on a store where
    nothing failed is an empty answer, not a typo. Every run is checked for the cell that keys its table row
    (`results` and `report` alike), filtered or not: the report takes fine-tuning's rows from the whole store."""
    for r in runs:  # a row edited outside cleantune may lack them
        missing = next((k for k in ("dataset", "attack", "defense") if not isinstance(r["config"].get(k), str)), None)
        if missing:
            raise UserError(f"--store {store}: run {r['id']} has a corrupt 'config' column (no '{missing}')")
    for key, wanted in where.items():
        if key == "status":
            odd = [v for v in wanted if v not in STATUSES]
            if odd:
                raise UserError(f"--status {odd[0]}: not a run status ({', '.join(STATUSES)})")
            continue
        held = sorted({_value(r, key) for r in runs})
        missing = [v for v in wanted if v not in held]
        if missing:
            raise UserError(f"--{key} {missing[0]}: no run in {store} has it (they have: {', '.join(held) or 'none'})")
    return [r for r in runs if matches(r, where)]


def xdg_dir(variable: str, default: str) -> Path:
    """cleantune's folder under an XDG base directory. The spec: an unset, empty or relative variable means
    the default under the home folder (a relative one would put stores, runs and caches wherever the command
    happens to run)."""
    xdg = os.environ.get(variable, "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / default) / "cleantune"


def data_dir() -> Path:
    return xdg_dir("XDG_DATA_HOME", ".local/share")


def default_store_path() -> Path:
    return data_dir() / "results.sqlite"


def strict_json(obj, **kwargs) -> str:
    """JSON that strict readers (JavaScript's, jq) accept: an undefined value (NaN, as a detection recall with
    no poisoned sample or a frequency error without its set) is written as null, not as a bare NaN."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _retry(fn, attempts: int = 8):
    """Run fn, retrying on 'database is locked'. The busy timeout covers most contention, but SQLite
    returns SQLITE_BUSY at once in some cases (switching to WAL while another process opens the file,
    a read transaction that must be upgraded), so what slips through is retried with backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.1 * 2 ** min(attempt, 5))


def store_path(path: str | Path | None) -> Path:
    """--store as given, or the default store when unset."""
    if path is None:
        return default_store_path()
    if isinstance(path, str) and not path.strip():  # Path("") would be the working folder
        raise UserError("--store: empty path")
    return Path(path)


def missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist, innermost first: what a mkdir(parents=True) makes, for
    remove_empty."""
    return [p for p in path.parents if not p.exists()]


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks (a model's weights need not fit in memory twice)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_creatable(path: Path, label: str) -> None:
    """Refuse a path whose nearest existing ancestor is a file or a folder this process cannot write."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{label}: cannot create it ({parent} is not a folder)")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{label}: cannot create it ({parent} is not a writable folder)")


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above `path`; the ones created, innermost first, for remove_empty."""
    missing = missing_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed command created on its way in (missing_parents), innermost first, where still
    empty: nothing of the command is left behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:  # never made (the command failed before it got there), or gone
            continue
        except OSError:  # not empty: another process has used it since
            return


def write_whole(out: Path, files: dict[Path, bytes], what: str) -> None:
    """Write `files` (paths in or under the folder `out`) all or none: each under a hidden `.NAME.partial` name
    first, renamed into place once every one is whole. A full disk or an interrupt midway leaves an earlier
    output there as it was (it left a cut file beside another run's), and a folder it made is removed again;
    other files in `out` are never touched. An OSError is a one-line UserError naming --out."""
    made = sorted({p for f in files for p in missing_parents(f)}, key=lambda p: len(p.parts), reverse=True)
    written = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            written.append(partial_path(path))
            written[-1].write_bytes(data)
    except BaseException as e:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        remove_empty(made)  # innermost first
        if isinstance(e, OSError):
            raise UserError(f"--out {out}: cannot write the {what} ({e.strerror or e})") from None
        raise
    for path in files:
        partial_path(path).replace(path)


def partial_path(path: Path) -> Path:
    """Where write_whole writes `path` before it is whole: a hidden `.NAME.partial` beside it."""
    return path.with_name(f".{path.name}.partial")


def is_partial(path: Path) -> bool:
    """A file write_whole left half written (a kill cut it short); the next write replaces it."""
    return path.name.startswith(".") and path.name.endswith(".partial") and path.is_file()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # JSON true would count as 1


def _finite(v) -> bool:
    """A stored score or timing: no score or timing is infinite, so one (1e999 read back) is an edit. NaN is
    kept: an undefined score (a detection recall with no poisoned sample) is stored as one."""
    return _number(v) and not math.isinf(v)


class ResultStore:
    """WAL mode, a busy timeout and retries, so several processes (sweep workers, two sweeps at once)
    can write to one file on one machine. (WAL needs shared memory: not for network filesystems.)"""

    def __init__(self, path: str | Path | None = None, readonly: bool = False):
        """`readonly` (results, report): the file must exist and is opened read-only, so it is never changed; a
        store no process has open can be read in a read-only folder, and nothing is left beside it. Otherwise it
        is created when missing. Either way an SQLite file holding other tables is refused, not changed."""
        self.path = store_path(path)
        label = f"--store {self.path}"
        if self.path.is_dir():
            raise UserError(f"{label}: a folder, not a store file")
        if readonly and not self.path.is_file():
            raise UserError(f"{label}: no such file" + ("" if path is not None else " (no run stored yet)"))
        companions = [Path(f"{self.path}{s}") for s in ("-wal", "-shm")]
        created = [c for c in companions if not c.exists()]
        self._made: list[Path] = []
        try:
            if not readonly:
                if not self.path.exists():  # a file in the way of a folder said as such, not as errno 17
                    check_creatable(self.path, label)
                self._made = make_parents(self.path)
            mode = "rwc"
            if readonly:
                # Without a -wal no process has the store open (the last to close writes the WAL into the file
                # and removes it), so the file holds every run and is read as immutable: SQLite then makes no
                # -wal/-shm, which a read-only connection can neither create in a read-only folder nor remove.
                # (A writer opening it meanwhile changes the file only when it checkpoints a stored run.) With a
                # -wal a writer may hold runs there that immutable would not see: read-only WAL access reads
                # them (it needs the -shm as well, or a folder to make it in).
                mode = "ro" if companions[0].exists() else "ro&immutable=1"
            uri = f"{self.path.absolute().as_uri()}?mode={mode}"
            self.conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
            tables = {r[0] for r in _retry(lambda: self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall())}
            if "runs" not in tables and (tables or readonly):
                raise UserError(f"{label}: not a cleantune results store (tables: {', '.join(sorted(tables)) or 'none'})")
            if "runs" in tables and [r[1] for r in self.conn.execute("PRAGMA table_info(runs)")] != COLUMNS:
                raise UserError(f"{label}: its 'runs' table has other columns; not a cleantune results store")
            stamp = _retry(lambda: self.conn.execute("PRAGMA user_version").fetchone()[0])
            if stamp > STORE_FORMAT:
                raise UserError(f"{label}: written by a later cleantune (store format {stamp}, this version reads "
                                f"{STORE_FORMAT} and earlier); upgrade cleantune to read it")
            if not readonly:
                _retry(lambda: self.conn.execute("PRAGMA journal_mode=WAL"))
                _retry(lambda: self.conn.execute(SCHEMA))
                _retry(self._probe_write)
        except (sqlite3.DatabaseError, OSError, UserError) as e:
            if hasattr(self, "conn"):
                self.conn.close()
            remove_empty(self._made)
            if readonly:  # a store refused on reading is left as it was found
                for c in created:
                    c.unlink(missing_ok=True)
            if isinstance(e, UserError):
                raise
            if "readonly" in str(e):  # "attempt to write a readonly database"
                raise UserError(f"{label}: cannot write to it ({e})") from None
            raise UserError(f"{label}: cannot open it as a cleantune results store ({e})") from None

    def discard_if_empty(self) -> None:
        """Close, and delete the file with its WAL companions if it holds no run and no other process has it
        open: for a store the command created, when it ends before storing anything (an interrupt, an error no
        check foresaw)."""
        if self.runs():
            return
        self.conn.close()
        # Another process may have opened the store meanwhile (a sweep started on the same new file): deleting it
        # then sent that process's runs to a file no path named, lost without a word. Leaving WAL needs every
        # other connection closed, and the exclusive lock keeps a newcomer from writing until the file is gone.
        conn = None
        try:  # mode=rw: a file that is gone already is not made again
            conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=rw", uri=True, timeout=0, isolation_level=None)
            if conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0] != "delete":
                return
            conn.execute("BEGIN EXCLUSIVE")
            if conn.execute("SELECT count(*) FROM runs").fetchone()[0]:
                return
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            remove_empty(self._made)
        except sqlite3.OperationalError:  # in use: the process using it keeps it
            return
        finally:
            if conn is not None:
                conn.close()

    def _probe_write(self) -> None:
        """A write, kept only where it stamps the format (a new store, or one written before the stamp), else
        rolled back. SQLite opens a file this process may not write read-only without a word, and a run would
        train for hours, then fail to store its result."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            stamp = self.conn.execute("PRAGMA user_version").fetchone()[0]
            self.conn.execute(f"PRAGMA user_version = {STORE_FORMAT}")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT" if stamp < STORE_FORMAT else "ROLLBACK")

    def get(self, run_id: str) -> dict | None:
        row = _retry(lambda: self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
        return self._row(row) if row else None

    def put(self, run_id: str, config: dict, metrics: dict, timings: dict, env: dict,
            status: str = "ok", error: str | None = None) -> None:
        row = (run_id, json.dumps(config, sort_keys=True), status, json.dumps(metrics), json.dumps(timings),
               json.dumps(env), error, time.time())
        # a failure never replaces a stored success (two sweeps may run the same cell at once)
        guard = "" if status == "ok" else " WHERE runs.status != 'ok'"
        _retry(lambda: self.conn.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET config = excluded.config, "
            "status = excluded.status, metrics = excluded.metrics, timings = excluded.timings, env = excluded.env, "
            "error = excluded.error, created = excluded.created" + guard, row))

    def stored_ids(self) -> set[str]:
        """The ids of the successful runs, without reading their other columns: a sweep that only needs to
        know what to skip is not stopped by one damaged row (which `runs()` refuses)."""
        return {r[0] for r in _retry(lambda: self.conn.execute("SELECT id FROM runs WHERE status = 'ok'").fetchall())}

    def runs(self) -> list[dict]:
        rows = _retry(lambda: self.conn.execute("SELECT * FROM runs ORDER BY created").fetchall())
        return [self._row(r) for r in rows]

    def _row(self, row) -> dict:
        id_, config, status, metrics, timings, env, error, created = row
        out = {"id": id_, "status": status, "error": error, "created": created}
        for name, text in (("config", config), ("metrics", metrics), ("timings", timings), ("env", env)):
            try:
                out[name] = json.loads(text)
            except (TypeError, ValueError, RecursionError):
                out[name] = None
            if not isinstance(out[name], dict):  # a row edited or damaged outside cleantune
                raise UserError(f"--store {self.path}: run {id_} has a corrupt '{name}' column")
        m = out["metrics"]
        bad = next((k for k in ("cacc", "asr", "asr_floor") if k in m and not _finite(m[k])), None)
        # the scores the report averages as well, where a run has them (null: undefined, as a BTU precision with
        # no token unlearned)
        scores = {k: m[k] for k in ("btu_token_precision", "btu_token_recall") if m.get(k) is not None}
        scores |= {f"{kind}.{k}": v for kind in ("train_detection", "test_detection")
                   if isinstance(m.get(kind), dict) for k, v in m[kind].items() if v is not None}
        bad = bad or next((k for k, v in scores.items() if not _finite(v)), None)
        bad = bad or next((k for k in ("train_detection", "test_detection")
                           if m.get(k) is not None and not isinstance(m[k], dict)), None)
        if bad:
            raise UserError(f"--store {self.path}: run {id_} has a corrupt '{bad}' metric "
                            f"({m[bad] if bad in m else scores[bad]!r})")
        # every timing is a number (or null): the report subtracts and divides them
        bad = next((k for k, v in out["timings"].items() if v is not None and not _finite(v)), None)
        if bad:
            raise UserError(f"--store {self.path}: run {id_} has a corrupt '{bad}' timing ({out['timings'][bad]!r})")
        return {k: out[k] for k in COLUMNS}
