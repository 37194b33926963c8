"""The Ray backend on a local Ray instance: the same cells, the same stored results as the local backend.
Marked `ray` and left out of the default test run (Ray start-up costs tens of seconds on 2 cores):
`pip install 'cleantune[ray]' && pytest -m ray`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleantune.store import ResultStore
from cleantune.sweep import load_grid, sweep

from helpers import sweep_table, write_grid

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")


def test_ray_sweep_stores_what_the_local_backend_stores(tiny_model, tmp_path, monkeypatch):
    grid = write_grid(tmp_path / "g.yaml", tiny_model)
    cells = load_grid(grid)
    local = sweep(cells, tmp_path / "local.sqlite", cpus_per_run=1, progress=False)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = sweep(cells, tmp_path / "ray.sqlite", backend="ray", progress=False)
        again = sweep(cells, tmp_path / "ray.sqlite", backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert (local.ran, remote.ran, remote.failed, again.ran, again.skipped) == (2, 2, [], 0, 2)
    ray_store, local_store = ResultStore(tmp_path / "ray.sqlite"), ResultStore(tmp_path / "local.sqlite")
    assert {r["id"] for r in ray_store.runs()} == {r["id"] for r in local_store.runs()}
    assert sweep_table(ray_store, cells) == sweep_table(local_store, cells)
    assert all(r["env"]["python"] and r["timings"]["wall_s"] > 0 for r in ray_store.runs())
