"""SQLite results store: one row per run, keyed by a hash of the full resolved run config."""

from __future__ import annotations

import hashlib
import json
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


def data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "cleantune"


def default_store_path() -> Path:
    return data_dir() / "results.sqlite"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class ResultStore:
    """WAL mode and a busy timeout, so several processes (sweep workers) can write to one file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise UserError(f"--store {self.path}: not a cleantune results store ({e})") from None

    def get(self, run_id: str) -> dict | None:
        row = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._row(row) if row else None

    def put(self, run_id: str, config: dict, metrics: dict, timings: dict, env: dict,
            status: str = "ok", error: str | None = None) -> None:
        for attempt in range(5):  # the busy timeout covers most contention; retry what slips through
            try:
                self.conn.execute(
                    "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, json.dumps(config, sort_keys=True), status, json.dumps(metrics),
                     json.dumps(timings), json.dumps(env), error, time.time()))
                return
            except sqlite3.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def runs(self) -> list[dict]:
        return [self._row(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY created")]

    @staticmethod
    def _row(row) -> dict:
        id_, config, status, metrics, timings, env, error, created = row
        return {"id": id_, "config": json.loads(config), "status": status, "metrics": json.loads(metrics),
                "timings": json.loads(timings), "env": json.loads(env), "error": error, "created": created}
