"""The body of one hyperparameter-search trial, without Ray: train a router over given experts
and validate it at fixed points, so a scheduler (ASHA) can stop weak trials early.

    router_trial(cfg, results, report=tune.report)   # the Ray Tune shell (results: the plan's LoRA stages)
    router_trial(cfg, results, report=seen.append)   # tests

The metric is ``accuracy``: mean exact match over the domains' ``eval`` split (first
``data.eval_limit`` rows); ``val_loss`` (mean completion loss there) breaks ties. Tune
*selects* on it, so it is a validation score: report final numbers from a run whose ``eval``
files were not used for selection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from loramix import evaluate, router_training, stages
from loramix.config import LoramixConfig

logger = logging.getLogger(__name__)

METRIC = "accuracy"


def eval_steps(steps: int, evals: int) -> list[int]:
    """``evals`` router steps spread evenly up to and including the last one."""
    return sorted({max(1, round(i * steps / evals)) for i in range(1, evals + 1)})


def validate(mm, evals: dict, tokenizer) -> dict[str, tuple[float, float]]:
    """``(exact match, completion loss)`` per domain of the routed mixture."""
    mm.eval()
    try:
        return {name: evaluate.score(mm, ex, tokenizer) for name, ex in evals.items()}
    finally:
        mm.train()


def router_trial(cfg: LoramixConfig, results: dict, *, report: Callable[[dict], None]) -> dict:
    """Train ``cfg``'s router over the experts in ``results`` (the plan's ``base``, ``expert/<d>``
    and ``universal`` results); at ``tune.evals_per_trial`` points report
    ``{"accuracy", "val_loss", "router_step", "loss", "accuracy/<domain>"...}``. Returns the last report."""
    base = results["base"]
    tokenizer = stages.load_tokenizer(base)
    universal = results["universal"].path if "universal" in results else None
    mm, batches, _ = stages.router_setup(cfg, base, stages.adapters_of(cfg, results), universal, tokenizer)
    evals = stages.eval_examples(cfg, tokenizer)
    points = set(eval_steps(cfg.router.steps, cfg.tune.evals_per_trial))
    last: dict = {}

    def on_step(metrics: dict, ckpt=None) -> None:
        if metrics["step"] not in points:
            return
        per = validate(mm, evals, tokenizer)
        last.clear()
        last[METRIC] = sum(acc for acc, _ in per.values()) / len(per)
        last["val_loss"] = sum(loss for _, loss in per.values()) / len(per)
        last.update({"router_step": metrics["step"], "loss": metrics["loss"]})
        last.update({f"{METRIC}/{name}": acc for name, (acc, _) in per.items()})
        logger.info("router step %d: %s %.3f", metrics["step"], METRIC, last[METRIC])
        report(dict(last))

    router_training.train_router(cfg.router, mm, batches, report=on_step, log_every=cfg.train.log_every)
    return last
