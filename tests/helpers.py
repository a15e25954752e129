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


def drive(scheduler, requests, arrivals: dict[int, list[int]]) -> list[list]:
    """Step ``scheduler`` until idle, submitting ``requests[i]`` before step ``s`` for each
    ``arrivals[s] = [i, ...]``; returns each request's Deltas."""
    out = [[] for _ in requests]
    step = 0
    while step <= max(arrivals) or not scheduler.idle():
        for i in arrivals.get(step, []):
            scheduler.submit(requests[i], out[i].append)
        scheduler.step()
        step += 1
    return out
