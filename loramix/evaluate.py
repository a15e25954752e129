"""Scoring: exact match of greedy completions, completion loss, router accuracy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from loramix.data import Example, collate, prompt_mask
from loramix.loops import device_of, to_device
from loramix.model import MixtureModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def exact_match(
    model, examples: Sequence[Example], tokenizer, *, batch_size: int = 64, generate_kwargs: dict | None = None
) -> float:
    """Fraction of examples whose greedy completion equals the reference exactly.

    ``model`` is anything with transformers' ``generate(input_ids=, attention_mask=, ...)``:
    a base model, a PEFT model or a :class:`~loramix.model.MixtureModel`.
    """
    hits, device = 0, device_of(model)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = to_device(collate(chunk, tokenizer.pad_token_id, prompt_only=True), device)
        longest = max(len(e.input_ids) - e.prompt_len for e in chunk)
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=longest,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **(generate_kwargs or {}),
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for e, row in zip(chunk, new.tolist()):
            want = e.input_ids[e.prompt_len :]  # completion + eos
            hits += row[: len(want)] == want
    return hits / max(len(examples), 1)


@torch.no_grad()
def completion_loss(
    forward: Callable[[dict], torch.Tensor], examples: Sequence[Example], pad_id: int, batch_size: int = 64
) -> float:
    """Token-weighted mean loss on completions; ``forward(batch)`` returns logits ``[b, t, V]``."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        logits = forward(batch)[:, :-1].float()
        labels = batch["labels"][:, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum", ignore_index=-100)
        total += float(loss)
        count += int((labels != -100).sum())
    return total / max(count, 1)


def score(model, examples: Sequence[Example], tokenizer) -> tuple[float, float]:
    """``(exact match, completion loss)`` of ``model`` on ``examples``, batches on the model's device.

    A mixture (or a wrapper of one with ``.model``) routes on the prompt only, as it does when
    generating; plain and PEFT models take the whole sequence.
    """
    device = device_of(model)
    routes = isinstance(getattr(model, "model", model), MixtureModel)

    def forward(batch):
        batch = to_device(batch, device)
        extra = {"route_mask": prompt_mask(batch)} if routes else {}
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits

    with torch.no_grad():
        return exact_match(model, examples, tokenizer), completion_loss(forward, examples, tokenizer.pad_token_id)


@torch.no_grad()
def router_confusion(
    mm, examples_by_domain: dict[str, Sequence[Example]], pad_id: int, batch_size: int = 64
) -> tuple[float, list[list[int]]]:
    """Router accuracy (top-1 gate == the example's domain) and the confusion matrix.

    ``confusion[i][j]`` counts prompts of domain ``i`` routed to expert ``j`` (in
    ``mm.expert_names`` order); domains without an expert of their name are skipped.
    """
    names, device = mm.expert_names, device_of(mm)
    confusion = [[0] * len(names) for _ in names]
    for domain, examples in examples_by_domain.items():
        if domain not in names:
            continue
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[i : i + batch_size], pad_id, prompt_only=True), device)
            picks = mm.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).argmax(-1)
            for j in picks.tolist():
                confusion[names.index(domain)][j] += 1
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(names)))
    return correct / max(total, 1), confusion


@torch.no_grad()
def gate_pattern(mm, examples_by_domain: dict[str, Sequence[Example]], pad_id: int, batch_size: int = 64) -> dict:
    """Mean gate of every expert at every routing decision, per domain (what ``gates.png`` draws).

    Returns:
        ``{"where": [decision, ...], "experts": [...], "domains": {domain: [[gate per expert] per decision]}}``;
        decisions are ``sequence`` (MoA), ``block.<i>`` (MoLE) or module paths (MoDULA).
    """
    device, where, out = device_of(mm), None, {}
    for domain, examples in examples_by_domain.items():
        sums, count = None, 0
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[i : i + batch_size], pad_id, prompt_only=True), device)
            pattern = mm.gate_pattern(batch["input_ids"], batch["attention_mask"])
            where = list(pattern)
            stacked = torch.stack([pattern[w].float().sum(0) for w in where])  # [decisions, E]
            sums = stacked if sums is None else sums + stacked
            count += batch["input_ids"].shape[0]
        out[domain] = (sums / max(count, 1)).tolist()
    return {"where": where or [], "experts": list(mm.expert_names), "domains": out}
