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
    groups) by name, and task/actor demands by shape.

    Read from the GCS the way ``ray status`` does (the autoscaler's demand summary), so it works
    without the dashboard, which ``ray.util.state`` would need."""
    from ray.autoscaler.v2.sdk import get_cluster_status  # what `ray status` reads; needs no dashboard

    demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    names = {pg_id: pg.get("name") for pg_id, pg in ray.util.placement_group_table().items()}
    waiting = []
    for pg in demands.placement_group_demand:
        bundles = [r.bundle for r in pg.bundles_by_count for _ in range(r.count)]
        waiting.append(f"placement group {names.get(pg.pg_id) or pg.pg_id[:8]} {bundles}")
    for demand in demands.ray_task_actor_demand:
        waiting += [f"{r.count} task(s)/actor(s) needing {r.bundle}" for r in demand.bundles_by_count]
    return waiting


def wait_with_bars(
    refs: dict[str, ray.ObjectRef],
    progress,
    poll_s: float = 0.5,
    stall_timeout_s: float | None = None,
    trainers: frozenset[str] = frozenset(),
) -> dict:
    """Wait for named Ray futures while drawing one bar per job posted to the ProgressActor.

    Args:
        stall_timeout_s: on a cluster nothing grows (a local instance), raise :class:`Unschedulable`
            when nothing progressed for this long while requests wait for resources. A stage that
            holds resources is progress however slow its steps: a running non-LoRA stage, or a
            LoRA stage (``trainers``) whose workers started; a LoRA stage whose trainer still waits
            for its placement group is not.

    Returns:
        name -> result. The first failing future raises (with the job's name in the message);
        then, as on Ctrl-C or :class:`Unschedulable`, the run is stopped (:func:`stop_run`), so no
        trainer of a failed run goes on holding the cluster's CPUs.
    """
    try:
        return _wait(refs, progress, poll_s, stall_timeout_s, trainers)
    except BaseException as err:
        stop_run(refs, progress, f"{type(err).__name__}: {err}"[:300], trainers)
        raise


def stop_run(
    refs: dict[str, ray.ObjectRef], progress, reason: str, trainers: frozenset[str] = frozenset(), settle_s=60.0
) -> None:
    """Set the run's stop flag and wait (at most ``settle_s``) for its stages that hold resources
    to end (:func:`working`; a trainer still waiting for its placement group holds none).

    Stages not started yet refuse to start once they are scheduled; running trainers are aborted by
    their stage task (``actors.stage_tasks``). Never ``ray.cancel``: cancelling a task as it finishes
    aborts the driver in Ray 2.60 (task_manager.cc "Check failed: it != submissible_tasks_.end()").
    """
    progress.stop.remote(reason)
    deadline = time.monotonic() + settle_s
    pending = list(refs.values())
    while pending and time.monotonic() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if not working(ray.get(progress.snapshot.remote()), trainers):
            return


def working(snapshot: dict, trainers: frozenset[str]) -> list[str]:
    """Running stages that hold resources: any but a LoRA stage (``trainers``) whose workers have
    not started (its trainer still waits for its placement group)."""
    return [s for s in snapshot["running"] if s not in trainers or s in snapshot["nodes"]]


def _wait(refs: dict[str, ray.ObjectRef], progress, poll_s: float, stall_timeout_s: float | None, trainers) -> dict:
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
        if seen != last_seen or working(snap, trainers):
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
