"""Progress bars for long work (tqdm lives in shells only, never in the core)."""

from __future__ import annotations

import time

import ray
from tqdm.auto import tqdm


def bar_report(desc: str, total: int):
    """A ``report(metrics, ckpt)`` callback that drives one tqdm bar with the loss in its postfix."""
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def report(metrics: dict, ckpt=None) -> None:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return report


class Unschedulable(RuntimeError):
    """Work waits for resources this cluster does not have, and nothing will add them."""


def waiting_for_resources() -> list[str]:
    """Resource requests Ray cannot place right now: pending placement groups (trainer worker
    groups), tasks and actors, each as ``name {resources}``."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    groups = list_placement_groups(filters=[("state", "=", "PENDING")], detail=True)
    waiting = [f"placement group {pg.name or pg.placement_group_id[:8]} {pg.bundles}" for pg in groups]
    waiting += [f"task {t.name}" for t in list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")])]
    waiting += [f"actor {a.class_name}" for a in list_actors(filters=[("state", "=", "PENDING_CREATION")])]
    return waiting


def wait_with_bars(
    refs: dict[str, ray.ObjectRef], progress, poll_s: float = 0.5, stall_timeout_s: float | None = None
) -> dict:
    """Wait for named Ray futures while drawing one bar per job posted to the ProgressActor.

    Args:
        stall_timeout_s: on a cluster nothing grows (a local instance), raise :class:`Unschedulable`
            when nothing progressed for this long while requests wait for resources.

    Returns:
        name -> result. The first failing future raises (with the job's name in the message).
    """
    bars: dict[str, tqdm] = {}
    pending = dict(refs)
    results = {}
    last_change, last_seen = time.monotonic(), None
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=poll_s)
        for name, ref in list(pending.items()):
            if ref in ready:
                if name in bars:  # finished: draw it complete once, then stop refreshing it
                    bars[name].n = bars[name].total
                    bars.pop(name).close()
                try:
                    results[name] = ray.get(ref)
                except Exception as err:
                    for bar in bars.values():
                        bar.close()
                    raise RuntimeError(f"stage `{name}` failed: {err}") from err
                del pending[name]
        snap = ray.get(progress.snapshot.remote())
        seen = (len(pending), snap["jobs"])
        if seen != last_seen:
            last_seen, last_change = seen, time.monotonic()
        elif stall_timeout_s is not None and time.monotonic() - last_change > stall_timeout_s:
            waiting = waiting_for_resources()
            if waiting:
                for bar in bars.values():
                    bar.close()
                raise Unschedulable(
                    f"nothing progressed for {stall_timeout_s:.0f} s and these wait for resources this cluster "
                    f"({ray.cluster_resources()}) cannot give them: {'; '.join(waiting[:5])}. Lower "
                    "`resources.cpus_per_worker` / `resources.num_workers`, set `resources.use_gpu: false` on "
                    "a cluster without GPUs, or run on a bigger cluster."
                )
            last_change = time.monotonic()
        for job, (step, total, loss) in snap["jobs"].items():
            if job not in pending:
                continue
            if job not in bars:
                bars[job] = tqdm(total=total, desc=job, unit="step", dynamic_ncols=True, position=len(bars))
            bar = bars[job]
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.refresh()
        time.sleep(0 if not pending else 0.05)
    for bar in bars.values():
        bar.close()
    return results
