"""What a finished search leaves behind: ``results.json``, ``best.yaml`` and ``metric.png``."""

from __future__ import annotations

import logging
from pathlib import Path

from loramix.artifact import write_json
from loramix.config import LoramixConfig, apply_values, build_config, dump_config
from loramix.tuning import METRIC

logger = logging.getLogger(__name__)


def trial_rows(grid, max_t: int) -> list[dict]:
    """One row per trial: parameters, final metric, its history, status and time."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        df = result.metrics_dataframe
        history = [] if df is None or METRIC not in df else [float(x) for x in df[METRIC].dropna()]
        iterations = int(metrics.get("training_iteration", 0) or 0)
        status = "error" if result.error else ("completed" if iterations >= max_t else "early_stopped")
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(result.path).name,
                "params": dict(result.config or {}),
                METRIC: metrics.get(METRIC),
                "val_loss": metrics.get("val_loss"),
                "history": history,
                "router_step": metrics.get("router_step"),
                "status": status,
                "seconds": metrics.get("time_total_s"),
                "error": None if result.error is None else str(result.error).splitlines()[0],
            }
        )
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def rank_key(row: dict) -> tuple:
    """Higher accuracy wins; among equal accuracies, lower validation loss."""
    return (row[METRIC], -(row["val_loss"] if row["val_loss"] is not None else float("inf")))


def write_results(grid, cfg: LoramixConfig, tune_dir: Path, launched: list[str], *, seconds: float) -> dict:
    """Write the three outputs; the best trial is the argmax of each trial's final ``accuracy``
    (ties: lowest ``val_loss``)."""
    rows = trial_rows(grid, cfg.tune.evals_per_trial)
    scored = [r for r in rows if r[METRIC] is not None]
    if not scored:
        first = next((r["error"] for r in rows if r["error"]), "no trial reported a metric")
        raise RuntimeError(f"every trial failed; first error: {first}. Trial logs are under {tune_dir / 'ray'}.")
    best = max(scored, key=rank_key)
    header = (
        f"# Best trial of `loramix tune` ({best['trial_id']}: {METRIC} {best[METRIC]:.3f} on the eval split).\n"
        f"# Run it: loramix run {tune_dir / 'best.yaml'}\n"
    )
    (tune_dir / "best.yaml").write_text(header + best_config(cfg, best["params"]))
    summary = {
        "metric": METRIC,
        "mode": "max",
        "space": cfg.tune.space,
        "best": best,
        "trials": rows,
        "experts_trained": launched,
        "seconds": seconds,
    }
    write_json(tune_dir / "results.json", summary)
    plot(rows, tune_dir / "metric.png")
    return summary


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against each searched parameter, coloured by router top-k when it was searched."""
    import matplotlib  # the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # the Agg backend is chosen before pyplot loads

    scored = [r for r in rows if r[METRIC] is not None]
    keys = sorted({k for r in scored for k, v in r["params"].items() if isinstance(v, (int, float, str))})
    keys = [k for k in ("expert.rank", "router.top_k") if k in keys] + [
        k for k in keys if k not in ("expert.rank", "router.top_k")
    ]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r["params"].get(key) for r in scored]
        colour = [r["params"].get("router.top_k", 0) for r in scored]
        xs = values if all(isinstance(v, (int, float)) for v in values) else [str(v) for v in values]
        points = ax.scatter(xs, [r[METRIC] for r in scored], c=colour, cmap="viridis", s=40)
        ax.set_xlabel(key)
        ax.set_ylabel(METRIC)
        if key == "expert.rank":
            ax.set_xscale("log", base=2)
    if scored and "router.top_k" in scored[0]["params"]:
        fig.colorbar(points, ax=axes[0].tolist(), label="router.top_k")
    fig.suptitle(f"loramix tune: {METRIC} per trial")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def best_config(cfg: LoramixConfig, params: dict) -> str:
    """The YAML of ``cfg`` with a trial's ``params`` applied (what ``loramix run`` takes)."""
    return dump_config(build_config(apply_values(cfg.model_dump(mode="json"), params), source="best trial"))
