"""Baseline merges go through PEFT; `cat` is exact, so it must equal the static mixture."""

import pytest
import torch
from helpers import assert_close, assert_differs, logits
from tiny import batch, make_adapter, tiny_llama

from loramix import MixtureModel
from loramix.merge_baselines import merge_adapters


def test_cat_merge_equals_static_mixture(adapters):
    weights = {"reverse": 0.5, "sort": 0.3, "shift": 0.2}
    merged = merge_adapters(tiny_llama(0), adapters, combination_type="cat", weights=weights)
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router=None)
    ids, mask = batch(13)
    ref = logits(mm, ids, mask, expert_weights=torch.tensor(list(weights.values())))
    assert_differs(ref, logits(tiny_llama(0), ids, mask))
    assert_close(logits(merged, ids, mask), ref)


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_rough_merges_differ_from_each_expert(tmp_path, combination):
    """PEFT's linear/ties need equal ranks; they combine A and B separately, so differ from every expert."""
    adapters = {f"e{i}": make_adapter(0, tmp_path / f"e{i}", seed=20 + i, r=4) for i in range(3)}
    merged = merge_adapters(tiny_llama(0), adapters, combination_type=combination, density=0.5)
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router=None)
    ids, mask = batch(14)
    out = logits(merged, ids, mask)
    assert_differs(out, logits(tiny_llama(0), ids, mask), min_diff=1e-4)
    for i in range(3):
        assert_differs(out, logits(mm, ids, mask, expert_weights=torch.eye(3)[i]), min_diff=1e-4)


def test_linear_merge_over_different_ranks_is_a_clear_error(adapters):
    """PEFT refuses; the error says which experts and which combination."""
    with pytest.raises(ValueError, match="PEFT could not merge .* with `linear`"):
        merge_adapters(tiny_llama(0), adapters, combination_type="linear")


def test_dotted_names_and_unknown_weights(adapters):
    same_rank = {"v1.0": adapters["reverse"], "v1.1": adapters["reverse"]}
    merged = merge_adapters(tiny_llama(0), same_rank, combination_type="linear")
    assert merged.active_adapter == "loramix_merged"
    with pytest.raises(ValueError, match=r"unknown experts \['nope'\]"):
        merge_adapters(tiny_llama(0), adapters, weights={"nope": 1.0})


def test_experts_named_like_module_attributes_merge(adapters):
    """PEFT keys modules by adapter name: an expert called `double` (an nn.Module method) broke the
    merge baselines of a whole run before adapter names became positional."""
    named = {"double": adapters["reverse"], "train": adapters["sort"], "to": adapters["shift"]}
    merged = merge_adapters(tiny_llama(0), named, combination_type="cat")
    mm = MixtureModel.from_adapters(tiny_llama(0), named, router=None)
    ids, mask = batch(15)
    assert_close(logits(merged, ids, mask), logits(mm, ids, mask, expert_weights=torch.full((3,), 1 / 3)), atol=1e-4)
