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


LM_HEAD_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.mark.parametrize("recipe", [None, "moa", "mole", "modula"])
def test_experts_that_adapt_the_lm_head_match_peft(tmp_path, recipe):
    """`expert.target_modules` may add `lm_head` (what an expert needs when its answers use tokens
    the base never produced): the head sits outside every block, so MoLE gates it with the last
    block's gates. Pinned to one expert, the mixture computes PEFT's logits for every recipe."""
    from tiny import make_adapter

    adapters = {n: make_adapter(0, tmp_path / n, seed=i + 1, targets=LM_HEAD_TARGETS) for i, n in enumerate("ab")}
    mixture = MixtureModel.from_adapters(tiny_llama(0), adapters, router=recipe, top_k=2).eval()
    assert any(key.endswith("lm_head") for key in mixture.layers)
    ids, mask = batch()
    for i, name in enumerate(adapters):
        ref = logits(PeftModel.from_pretrained(tiny_llama(0), adapters[name]).eval(), ids, mask)
        assert_differs(ref, logits(tiny_llama(0), ids, mask))
        # the head's LoRA adds to logits of magnitude ~10: float32 summation order, 1e-6 relative
        assert_close(
            logits(mixture, ids, mask, expert_weights=one_hot(3, 2, i)), ref, atol=1e-6 * ref.abs().max().item() * 10
        )
        if (
            recipe is None
        ):  # merged into a plain copy of the base (routed serving): the head only, not the tied embedding
            merged = mixture.merged_base([float(j == i) for j in range(2)])
            assert_close(logits(merged, ids, mask), ref, atol=1e-6 * ref.abs().max().item() * 10)
            embed = merged.get_input_embeddings().weight
            assert torch.equal(embed, tiny_llama(0).get_input_embeddings().weight)
    if recipe is not None:  # and the router's own gates run through the head too
        routed = logits(mixture, ids, mask)
        assert torch.isfinite(routed).all()
        assert_differs(routed, logits(mixture, ids, mask, expert_weights=torch.zeros(3, 2)))


def test_an_adapter_whose_copy_of_a_tied_weight_differs_from_the_base_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from tiny import make_adapter

    path = make_adapter(0, tmp_path / "a", seed=1, targets=LM_HEAD_TARGETS)
    state = load_file(f"{path}/adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lm_head.base_layer.weight"))  # PEFT saved the tied head
    state[key] = state[key] + 1.0
    save_file(state, f"{path}/adapter_model.safetensors")
    with pytest.raises(ValueError, match="carries its own 'lm_head' weights, which differ from the base's"):
        MixtureModel.from_adapters(tiny_llama(0), {"a": path}, router=None)
