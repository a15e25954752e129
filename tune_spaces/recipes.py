"""The three published recipes against each other at every top-k, over one shared set of experts."""

from ray import tune


def space(cfg) -> dict:
    n = len(cfg.data.domains)
    return {
        "recipe": tune.grid_search(["moa", "mole", "modula"]),
        "router.top_k": tune.grid_search(list(range(1, n + 1))),
    }
