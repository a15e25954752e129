"""Everything that usually matters: recipe, rank, alpha, top-k and both learning rates.

Sampled (not a grid): use with `tune.searcher: optuna` and a `tune.num_samples` of 20 or more.
"""

from ray import tune


def space(cfg) -> dict:
    n = len(cfg.data.domains)
    return {
        "recipe": tune.choice(["moa", "mole", "modula"]),
        "expert.rank": tune.choice([4, 8, 16, 32]),
        "expert.alpha": tune.choice([8, 16, 32, 64]),
        "expert.lr": tune.loguniform(1e-4, 1e-2),
        "router.top_k": tune.randint(1, n + 1),
        "router.lr": tune.loguniform(1e-4, 3e-2),
    }
