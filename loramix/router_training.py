"""Training a mixture's router over frozen experts, the way its recipe says (:mod:`loramix.recipes`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from loramix import loops
from loramix.config import RouterConfig
from loramix.recipes import RECIPES

logger = logging.getLogger(__name__)


def train_router(
    cfg: RouterConfig,
    mm,
    batches: Iterable[dict],
    *,
    report: loops.Report,
    stepper: loops.Stepper | None = None,
    log_every: int = 10,
) -> dict:
    """Train only the router of a :class:`~loramix.model.MixtureModel` (base and experts frozen),
    on what its recipe trains it with (:meth:`Router.loss`: labels for MoA, LM + balance otherwise;
    ``cfg.balance_coef`` unset takes the recipe's weight, ``cfg.label_coef`` adds routing labels)."""
    if mm.router is None:
        raise ValueError("this mixture has no router to train; build it with router='moa'|'mole'|'modula'.")
    frozen = [n for n, p in mm.named_parameters() if p.requires_grad and not n.startswith("router.")]
    if frozen:
        raise ValueError(f"only router parameters may train, but {frozen[:3]} require grad.")
    n_train = sum(p.numel() for p in mm.router.parameters())
    n_frozen = sum(p.numel() for p in mm.base_model.parameters())
    logger.info("router %s: %s trainable / %s frozen parameters", mm.router.recipe, f"{n_train:,}", f"{n_frozen:,}")
    stepper = stepper or loops.TorchStepper(mm.router.named_parameters(), cfg)
    recipe = RECIPES.get(mm.router.recipe)
    balance = cfg.balance_coef if cfg.balance_coef is not None else (recipe.balance_coef if recipe else 0.0)

    def loss_fn(model, batch):
        return model.router.loss(model, batch, balance, cfg.label_coef)

    return loops.run_steps(mm, batches, loss_fn, stepper, report=report, log_every=log_every, max_steps=cfg.steps)
