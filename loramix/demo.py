"""The whole pipeline in one process without Ray: ``loramix demo CONFIG``.

The same stage graph as ``loramix run`` (:mod:`loramix.plan`), run one stage after another with a
plain torch optimizer instead of DeepSpeed workers. Useful to try a config on a laptop and as the
reference the Ray pipeline is compared against; finished stages are reused on a rerun.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from loramix import plan, synthetic
from loramix.config import LoramixConfig, absolute_paths
from loramix.lock import output_lock
from loramix.report import finish_run

logger = logging.getLogger(__name__)


def ensure_demo_data(cfg: LoramixConfig) -> None:
    """Write the demo JSONL files a config names (``<task>.train.jsonl`` / ``<task>.eval.jsonl`` of a
    demo task, e.g. ``data/demo/reverse.train.jsonl``) if they are missing."""
    paths = [p for d in cfg.data.domains for p in (d.train, d.eval)] + [cfg.data.general, cfg.universal.train]
    for path in paths:
        if not path or Path(path).exists():
            continue
        task, _, split = Path(path).name.removesuffix(".jsonl").rpartition(".")
        if task in synthetic.TASKS and split in ("train", "eval"):
            n, seed = (4000, 0) if split == "train" else (200, 1)
            synthetic.write_jsonl(synthetic.make_rows(task, n, seed=seed), path)
            logger.info("wrote demo %s data for %s to %s", split, task, path)


def run_demo(cfg: LoramixConfig, out: str | Path, progress: plan.Progress = plan.quiet) -> dict:
    """Run every stage in-process; returns (and writes) the report.

    Args:
        progress: ``progress(job, total_steps) -> report`` callback factory (a tqdm bar in the CLI).
    """
    out = Path(out).resolve()
    cfg = cfg.model_copy(update={"output": str(out)})
    ensure_demo_data(cfg)
    cfg = absolute_paths(cfg)
    with output_lock(out):
        t0 = time.perf_counter()
        results, cached = plan.run_local(cfg, progress)
        timings = {name: 0.0 if name in cached else getattr(r, "seconds", 0.0) for name, r in results.items()}
        timings["total"] = time.perf_counter() - t0
        return finish_run(out, cfg, results, timings=timings, cached=cached)
