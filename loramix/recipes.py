"""The three published recipes as registry entries: nothing outside this file branches on a recipe's name.

A recipe owns its router class (which also defines the router's training loss, see
:meth:`Router.loss`), its default balance-loss weight, whether it trains a universal LoRA and the
config checks that only make sense for it. A fourth recipe is one :class:`Recipe` and one router.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramix.routers import BlockGate, Router, SequenceRouter, TokenRouter

UNIVERSAL = "universal"  # the name of MoDULA's universal LoRA among the routed experts


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str
    router: type[Router]
    balance_coef: float
    """Default weight of the balance loss (`router.balance_coef` unset)."""
    universal: bool = False
    """May train a universal LoRA first (`universal.enabled`)."""
    router_options: tuple[str, ...] = ()
    """`router.*` fields passed to the router's constructor (saved with it)."""

    def router_kwargs(self, router_cfg) -> dict:
        return {name: getattr(router_cfg, name) for name in self.router_options}

    def check(self, cfg) -> list[str]:
        """Problems of ``cfg`` (a :class:`~loramix.config.LoramixConfig`) this recipe cannot run."""
        problems = []
        if cfg.universal.enabled and not self.universal:
            problems.append(
                f"`universal.enabled` trains MoDULA's universal LoRA, but recipe `{self.name}` does not use one. "
                "Set `recipe: modula` or `universal.enabled: false`."
            )
        if cfg.universal.enabled and UNIVERSAL in [d.name for d in cfg.data.domains]:
            problems.append(f"domain name `{UNIVERSAL}` is taken by the universal LoRA (`universal.enabled`); rename.")
        if cfg.universal.domain_share and not cfg.universal.train:
            problems.append(
                "`universal.domain_share` mixes domain rows into `universal.train`, which is unset (the universal "
                "LoRA then trains on the union of the domains already); set `universal.train` or the share to 0."
            )
        return problems


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("moa", "MoA, arXiv 2403.03432", SequenceRouter, balance_coef=0.0),
        # MoLE's alpha: the paper's default weight of its gating balance loss.
        Recipe("mole", "MoLE, arXiv 2404.13628", BlockGate, balance_coef=0.5, router_options=("temperature",)),
        # MoDULA trains its router with the LM loss alone.
        Recipe(
            "modula",
            "MoDULA, arXiv 2412.07405",
            TokenRouter,
            balance_coef=0.0,
            universal=True,
            router_options=("context",),
        ),
    )
}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    return RECIPES[name]


def routed_experts(cfg) -> list[str]:
    """The gate columns of a config's mixture: MoDULA's universal LoRA first (when trained), then the domains."""
    names = [d.name for d in cfg.data.domains]
    return [UNIVERSAL, *names] if cfg.universal.enabled else names


def balance_coef(cfg) -> float:
    """`router.balance_coef`, else the recipe's default."""
    coef = cfg.router.balance_coef
    return get(cfg.recipe).balance_coef if coef is None else coef
