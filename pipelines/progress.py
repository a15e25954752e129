"""Progress bars for long work (tqdm lives in shells only, never in the core)."""

from __future__ import annotations

from tqdm.auto import tqdm


def bar_report(desc: str, total: int):
    """A ``report(metrics, ckpt)`` callback that drives one tqdm bar with the loss in its postfix."""
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def report(metrics: dict, ckpt=None) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if bar.n >= total:
            bar.close()

    return report
