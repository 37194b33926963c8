"""The results store: what a put keeps, what reading refuses, and the JSON and hashes around it."""

import json
import re

import pytest

from cleantune.errors import UserError
from cleantune.store import ResultStore, config_hash, strict_json


def test_strict_json_writes_every_undefined_number_as_null():
    nan, inf = float("nan"), float("inf")
    text = strict_json({"recall": nan, "curve": (1.0, nan), "nested": {"x": [-inf, inf]}, "ok": 0.5})
    assert json.loads(text) == {"recall": None, "curve": [1.0, None], "nested": {"x": [None, None]}, "ok": 0.5}
    assert "NaN" not in text and "Infinity" not in text


def test_config_hash_ignores_key_order():
    # a config read from YAML and the same one built in Python are one run
    assert config_hash({"seed": 0, "attack": "badnets"}) == config_hash({"attack": "badnets", "seed": 0})
    assert config_hash({"seed": 0}) != config_hash({"seed": 1})


def test_a_failure_never_replaces_a_stored_success(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    s.put("cell", {"seed": 0}, {"cacc": 0.9}, {}, {})
    s.put("cell", {"seed": 0}, {}, {}, {}, status="failed", error="RuntimeError: out of memory")
    assert s.get("cell")["status"] == "ok" and s.get("cell")["metrics"] == {"cacc": 0.9}
    s.put("other", {"seed": 1}, {}, {}, {}, status="failed", error="RuntimeError: out of memory")
    s.put("other", {"seed": 1}, {"cacc": 0.8}, {}, {})  # a success replaces a failure
    assert s.get("other")["status"] == "ok" and s.get("other")["error"] is None


def test_a_failed_run_keeps_its_error_and_is_not_among_the_stored_ids(tmp_path):
    s = ResultStore(tmp_path / "s.sqlite")
    s.put("done", {"seed": 0}, {"cacc": 0.9}, {}, {"host": "a"})
    s.put("crashed", {"seed": 1}, {}, {}, {}, status="failed", error="RuntimeError: out of memory")
    assert s.stored_ids() == {"done"}  # a sweep runs the failed cell again
    got = s.get("crashed")
    assert (got["status"], got["error"]) == ("failed", "RuntimeError: out of memory")
    assert s.get("done")["env"] == {"host": "a"}


@pytest.mark.parametrize("metrics,msg", [
    ({"cacc": True}, "corrupt 'cacc' metric (True)"),  # JSON true would count as 1.0
    ({"cacc": 0.9, "asr_floor": "low"}, "corrupt 'asr_floor' metric ('low')"),
    # detection scores, which the report averages (a TypeError there)
    ({"cacc": 0.9, "train_detection": {"precision": "x"}}, "corrupt 'train_detection.precision' metric ('x')"),
    ({"cacc": 0.9, "btu_token_recall": [1]}, "corrupt 'btu_token_recall' metric ([1])"),
    ({"cacc": float("inf")}, "corrupt 'cacc' metric (inf)"),  # no score is: 1e999 edited in
])
def test_a_metric_that_is_no_number_is_refused_on_reading(tmp_path, metrics, msg):
    s = ResultStore(tmp_path / "s.sqlite")
    s.put("abc", {"seed": 0}, metrics, {}, {})
    with pytest.raises(UserError, match=re.escape(msg)):
        s.runs()


@pytest.mark.parametrize("timings,msg", [
    ({"wall_s": "fast"}, "corrupt 'wall_s' timing ('fast')"),  # the report's time x subtracted it: a TypeError
    ({"wall_s": 1.0, "stage_eval_s": [0.5]}, "corrupt 'stage_eval_s' timing ([0.5])"),
])
def test_a_timing_that_is_no_number_is_refused_on_reading(tmp_path, timings, msg):
    s = ResultStore(tmp_path / "s.sqlite")
    s.put("abc", {"seed": 0}, {"cacc": 0.9}, timings, {})
    with pytest.raises(UserError, match=re.escape(msg)):
        s.runs()


def test_a_store_holding_only_a_failed_run_is_not_discarded(tmp_path):
    path = tmp_path / "s.sqlite"
    s = ResultStore(path)
    s.put("crashed", {"seed": 1}, {}, {}, {}, status="failed", error="RuntimeError")
    s.discard_if_empty()
    assert path.exists()
    empty = ResultStore(tmp_path / "e.sqlite")
    empty.discard_if_empty()
    assert not list(tmp_path.glob("e.sqlite*"))


def test_an_empty_store_another_process_has_open_is_not_discarded(tmp_path):
    """`run` creates a store and is interrupted before storing anything while a sweep has the same new file open:
    deleting it sent the sweep's runs to a file no path named."""
    path = tmp_path / "s.sqlite"
    interrupted, sweep = ResultStore(path), ResultStore(path)
    interrupted.discard_if_empty()
    sweep.put("done", {"seed": 0}, {"cacc": 0.9}, {}, {})
    sweep.conn.close()
    assert [r["id"] for r in ResultStore(path, readonly=True).runs()] == ["done"]


def test_a_store_refused_on_reading_is_left_as_it_was_found(tmp_path):
    import sqlite3

    foreign = tmp_path / "other.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("PRAGMA journal_mode=WAL")  # reading a WAL database makes -wal and -shm files beside it
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="not a cleantune results store"):
        ResultStore(foreign, readonly=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]  # no -wal or -shm beside it


def test_reading_opens_the_store_read_only_and_leaves_nothing_beside_it(tmp_path):
    """A read-only connection to a WAL database made a -wal and -shm it could not remove (nor create in a
    read-only folder). A writer's runs still in its WAL are read all the same."""
    import sqlite3

    path = tmp_path / "s.sqlite"
    writer = ResultStore(path)
    writer.put("a", {"seed": 0}, {"cacc": 0.9}, {}, {})
    writer.conn.close()
    reader = ResultStore(path, readonly=True)
    assert [r["id"] for r in reader.runs()] == ["a"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # read-only also where file modes do not bind
        reader.conn.execute("PRAGMA user_version = 1")
    reader.conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite"]
    writer = ResultStore(path)  # open, with a run that is in its WAL only
    writer.put("b", {"seed": 1}, {"cacc": 0.8}, {}, {})
    assert (tmp_path / "s.sqlite-wal").stat().st_size > 0
    assert [r["id"] for r in ResultStore(path, readonly=True).runs()] == ["a", "b"]


def test_a_store_carries_its_format_and_one_from_a_later_format_is_refused(tmp_path):
    """A later cleantune that changes what the store holds raises the stamp; this one must refuse such a file (to
    read or to write) rather than misread its runs. A store from before the stamp (0) is stamped when written."""
    import sqlite3

    from cleantune.store import STORE_FORMAT

    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    store.put("a", {"seed": 0}, {"cacc": 0.9}, {}, {})
    store.conn.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == STORE_FORMAT
    con.execute("PRAGMA user_version = 0")  # as written before the stamp
    con.commit()
    con.close()
    assert [r["id"] for r in ResultStore(path, readonly=True).runs()] == ["a"]
    ResultStore(path).conn.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == STORE_FORMAT
    con.execute(f"PRAGMA user_version = {STORE_FORMAT + 1}")
    con.commit()
    con.close()
    for readonly in (True, False):
        with pytest.raises(UserError, match=f"later cleantune \\(store format {STORE_FORMAT + 1}"):
            ResultStore(path, readonly=readonly)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite"]


def test_an_empty_store_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="^--store: empty path$"):  # it read as the working folder: "--store ."
        ResultStore("")
    assert not list(tmp_path.iterdir())


def test_write_whole_that_fails_removes_only_the_folders_it_made(tmp_path):
    # a failed write takes back the folders it created, and no more: an existing (empty) folder the user chose
    # for --out, and the folders above it, are theirs and stay
    from cleantune.store import partial_path, write_whole

    mine = tmp_path / "mine"
    mine.mkdir()
    out = mine / "new" / "deeper"
    with pytest.raises(TypeError):  # the second file's data is not bytes: the write fails midway
        write_whole(out, {out / "a.md": b"x", out / "b.md": None}, "report")
    assert mine.is_dir() and list(mine.iterdir()) == []
    assert tmp_path.is_dir()
    assert not partial_path(out / "a.md").exists()


def test_only_hidden_dot_partial_files_count_as_write_whole_leftovers(tmp_path):
    # check_out_dir lets a folder of only leftovers be written into: a user's own `notes.partial` is no leftover
    from cleantune.store import is_partial, partial_path

    for name in ("notes.partial", ".notes.partial"):
        (tmp_path / name).write_text("x")
    assert partial_path(tmp_path / "report.md") == tmp_path / ".report.md.partial"
    assert is_partial(tmp_path / ".notes.partial")
    assert not is_partial(tmp_path / "notes.partial")
    (tmp_path / ".dir.partial").mkdir()
    assert not is_partial(tmp_path / ".dir.partial")  # a folder is nothing write_whole leaves
