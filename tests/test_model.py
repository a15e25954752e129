"""Mixture maths against PEFT: one-hot, static weights, zero weights, mixed batches."""

import pytest
import torch
from helpers import assert_close, assert_differs, logits, one_hot
from peft import PeftModel
from tiny import batch, tiny_llama

from loramix import MixtureModel

NAMES = ["reverse", "sort", "shift"]


@pytest.fixture(scope="module")
def mm(adapters):
    return MixtureModel.from_adapters(tiny_llama(0), adapters, router=None)


@pytest.mark.parametrize("i,name", list(enumerate(NAMES)))
def test_one_hot_matches_peft(mm, adapters, i, name):
    ids, mask = batch()
    ref = logits(PeftModel.from_pretrained(tiny_llama(0), adapters[name]).eval(), ids, mask)
    assert_differs(ref, logits(tiny_llama(0), ids, mask))
    assert_close(logits(mm, ids, mask, expert_weights=one_hot(3, 3, i)), ref)


def test_expert_names_keep_given_order(mm):
    assert mm.expert_names == NAMES


def test_static_weights_match_merged_weights(mm):
    ids, mask = batch(1)
    w = torch.tensor([0.7, -0.4, 1.3])
    merged = mm.merged_base(w)
    ref = logits(merged, ids, mask)
    assert_differs(ref, logits(tiny_llama(0), ids, mask))
    assert_close(logits(mm, ids, mask, expert_weights=w.expand(3, -1)), ref, atol=2e-5)


def test_zero_weights_give_base(mm):
    ids, mask = batch(2)
    assert_close(logits(mm, ids, mask, expert_weights=torch.zeros(3, 3)), logits(tiny_llama(0), ids, mask))


def test_mixed_batch_gives_each_rows_expert(mm):
    ids, mask = batch(3, b=3)
    w = torch.eye(3)  # row i uses expert i
    mixed = logits(mm, ids, mask, expert_weights=w)
    for i in range(3):
        single = logits(mm, ids[i : i + 1], mask[i : i + 1], expert_weights=one_hot(1, 3, i))
        assert_close(mixed[i : i + 1], single, atol=5e-5)  # batch-of-1 vs batch-of-3 matmul rounding
    assert_differs(mixed[0:1], logits(mm, ids[0:1], mask[0:1], expert_weights=one_hot(1, 3, 1)))


def test_partial_experts_different_targets(adapters, partial_adapter):
    """An expert adapting only q/v (with alpha_pattern) mixes with all-linear experts."""
    both = {"reverse": adapters["reverse"], "attn": partial_adapter}
    mm = MixtureModel.from_adapters(tiny_llama(0), both, router=None)
    ids, mask = batch(4)
    ref = logits(PeftModel.from_pretrained(tiny_llama(0), partial_adapter).eval(), ids, mask)
    assert_differs(ref, logits(tiny_llama(0), ids, mask))
    assert_close(logits(mm, ids, mask, expert_weights=one_hot(3, 2, 1)), ref)


def test_generate_matches_peft(mm, adapters):
    ids, mask = batch(5)
    peft_model = PeftModel.from_pretrained(tiny_llama(0), adapters["sort"]).eval()
    ref = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    out = mm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, expert_weights=one_hot(3, 3, 1))
    assert torch.equal(out, ref)
    base = tiny_llama(0).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(out, base)


def test_only_router_trains(adapters):
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router="mole")
    trainable = {n for n, p in mm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("router.") for n in trainable)
