"""`loramix tune` on a real local Ray: a 2 x 2 grid (rank x top-k) on the demo world, shared
experts, a stop (SIGINT) and resume that keeps finished trials, and a best.yaml that runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loramix.config import dump_config, load_config

from .conftest import small_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def finished_trials(out: Path, rungs: int) -> dict[str, int]:
    """Trial folder -> reports written, for trials that reported every rung."""
    done = {}
    for path in (out / "tune" / "ray" / "search").glob("trial_*/result.json"):
        n = len(path.read_text().splitlines())
        if n >= rungs:
            done[path.parent.name] = n
    return done


def test_search_shares_experts_resumes_and_best_runs(ray_local, tmp_path, monkeypatch):
    import ray

    from loramix.demo import run_demo
    from pipelines.tune import run_tune

    out = tmp_path / "out"
    cfg = small_config(
        tmp_path / "data",
        out,
        **{
            "router.steps": 4,
            "tune.space": "demo",
            "tune.evals_per_trial": 2,
            "tune.max_concurrent_trials": 1,
            "tune.cpus_per_trial": 0.5,
            "resources.cpus_per_worker": 0.5,
            "train.zero_stage": 0,
        },
    )
    config = tmp_path / "tune.yaml"
    # Relative data paths, as configs/quickstart.yaml has them: trials run in their own folders.
    config.write_text(dump_config(cfg).replace(str(tmp_path / "data"), "data"))
    address = ray.get_runtime_context().gcs_address
    # 1. Start the search as a separate driver and stop it (Ctrl-C) once the first trial finished.
    cmd = [sys.executable, "-m", "pipelines.cli", "tune", str(config), "--output", str(out), "--address", address]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not finished_trials(out, 2) and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
    before = finished_trials(out, 2)
    assert before, proc.communicate()[0][-3000:] if proc.poll() is not None else "no trial finished in time"
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert len(finished_trials(out, 2)) < 4, "the stop came too late to test resuming:\n" + log[-2000:]
    # 2. The same search again resumes: finished trials keep their reports, the rest complete.
    monkeypatch.chdir(tmp_path)
    result = run_tune(load_config(config), out)
    trials = result["trials"]
    assert len(trials) == 4 and all(t["status"] in ("completed", "early_stopped") for t in trials)
    after = finished_trials(out, 2)
    for name, reports in before.items():
        assert after[name] == reports, f"{name} was rerun"
    grid = {(t["params"]["expert.rank"], t["params"]["router.top_k"]) for t in trials}
    assert grid == {(2, 1), (2, 2), (4, 1), (4, 2)}
    # Experts are shared: rank 2 and rank 4 for 2 domains are 4 LoRAs, never one per trial;
    # the resumed driver only trains what the stopped one had not finished.
    state = sorted((out / "tune" / "shared" / "loras").glob("*/stages/*.json"))
    assert len(state) == 4
    assert len(result["experts_trained"]) <= 2
    # 3. The recorded best is the argmax, and best.yaml runs.
    saved = json.loads((out / "tune" / "results.json").read_text())
    top = max((t["accuracy"], -t["val_loss"]) for t in saved["trials"])
    assert (saved["best"]["accuracy"], -saved["best"]["val_loss"]) == top
    assert (out / "tune" / "metric.png").stat().st_size > 1000
    best = load_config(out / "tune" / "best.yaml")
    assert best.expert.rank == saved["best"]["params"]["expert.rank"]
    assert best.router.top_k == saved["best"]["params"]["router.top_k"]
    # The pipeline's stage bodies in one process (`loramix demo`): what `loramix run` executes, minus Ray.
    report = run_demo(best, tmp_path / "best")
    assert report["methods"]["mixture"]["avg"]["exact_match"] >= 0
    assert (tmp_path / "best" / "artifact" / "manifest.json").is_file()
