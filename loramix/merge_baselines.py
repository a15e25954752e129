"""Baseline merges of experts into one adapter, through PEFT's ``add_weighted_adapter``.

Note PEFT's ``linear`` and ``ties`` combine A and B separately, so the merged update is not
the weighted sum of the experts' updates (cross terms appear); ``cat`` and ``svd`` are exact.
These are the baselines the papers compare against, reported as PEFT computes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from peft import PeftModel

from loramix.names import check_expert_name

logger = logging.getLogger(__name__)

MERGED = "loramix_merged"


def merge_adapters(
    base_model,
    adapters: Mapping[str, str | Path],
    *,
    combination_type: str = "linear",
    weights: Mapping[str, float] | None = None,
    density: float = 0.5,
) -> PeftModel:
    """Load ``adapters`` into ``base_model`` and activate their PEFT merge.

    Args:
        combination_type: any PEFT combination (``linear``, ``ties``, ``cat``, ``svd``, ...).
        weights: per-expert weight (default: uniform ``1/N``).
        density: fraction kept by ``ties``/``dare``/``magnitude_prune`` merges.

    Raises:
        ValueError: unknown expert names in ``weights``, or PEFT refusing the merge (e.g.
            ``linear`` over different ranks), with the reason.
    """
    if not adapters:
        raise ValueError("merge_adapters needs at least one adapter.")
    names = [check_expert_name(n) for n in adapters]
    weights = dict(weights) if weights is not None else {n: 1.0 / len(names) for n in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"`weights` names unknown experts {unknown}; experts are {names}.")
    # Positional adapter names: PEFT keys modules by them, and an expert called `double` or `train`
    # collides with nn.Module attributes ("attribute 'double' already exists").
    keys = [f"expert_{i}" for i in range(len(names))]
    kwargs = {"density": density} if combination_type not in ("linear", "cat", "svd") else {}
    try:
        model = PeftModel.from_pretrained(base_model, str(adapters[names[0]]), adapter_name=keys[0])
        for name, key in zip(names[1:], keys[1:]):
            model.load_adapter(str(adapters[name]), adapter_name=key)
        model.add_weighted_adapter(
            keys, [weights.get(n, 0.0) for n in names], MERGED, combination_type=combination_type, **kwargs
        )
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ValueError(f"PEFT could not merge {names} with `{combination_type}`: {err}") from None
    model.set_adapter(MERGED)
    return model.eval()
