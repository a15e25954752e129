"""LoRA rank (alpha = 2 x rank) and router top-k: the two knobs MoA/MoLE results hinge on.

Experts depend only on rank and alpha, so every top-k of one rank reuses the same experts.
"""

from ray import tune


def space(cfg) -> dict:
    n = len(cfg.data.domains)
    return {
        "expert.rank": tune.grid_search([4, 8, 16]),
        "expert.alpha": tune.sample_from(lambda spec: 2 * spec.config["expert.rank"]),
        "router.top_k": tune.grid_search(list(range(1, n + 1))),
    }
