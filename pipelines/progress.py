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


def wait_with_bars(refs: dict[str, ray.ObjectRef], progress, poll_s: float = 0.5) -> dict:
    """Wait for named Ray futures while drawing one bar per job posted to the ProgressActor.

    Returns:
        name -> result. The first failing future raises (with the job's name in the message).
    """
    bars: dict[str, tqdm] = {}
    pending = dict(refs)
    results = {}
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
