"""Shared checks (as PEFT's testing_common.py)."""

from __future__ import annotations

import torch

ATOL = 1e-5


def logits(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def assert_differs(a: torch.Tensor, b: torch.Tensor, min_diff: float = 1e-2) -> None:
    """Sanity check that a comparison is not vacuous (PEFT: 'outputs are not the same')."""
    diff = (a - b).abs().max().item()
    assert diff > min_diff, f"outputs only differ by {diff:.3g}; the test would pass vacuously"


def one_hot(batch: int, n: int, i: int) -> torch.Tensor:
    w = torch.zeros(batch, n)
    w[:, i] = 1.0
    return w
