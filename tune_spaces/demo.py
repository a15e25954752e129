"""A 2 x 2 grid (rank 2 or 4, top-k 1 or 2) small enough for CI on the demo world.

Four trials, two distinct sets of experts: each set is trained once and shared.
"""

from ray import tune


def space(cfg) -> dict:
    return {
        "expert.rank": tune.grid_search([2, 4]),
        "router.top_k": tune.grid_search([1, 2]),
    }
