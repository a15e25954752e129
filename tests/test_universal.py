"""MoDULA universal LoRA: flan equals PEFT with both adapters active; res round-trips."""

import torch
from helpers import assert_close, assert_differs, logits, one_hot
from peft import LoraConfig, PeftModel
from tiny import batch, make_adapter, tiny_llama

from loramix import Expert, ExpertBank, MixtureModel


def test_flan_universal_plus_expert_equals_peft_both_active(adapters, tmp_path):
    uni = make_adapter(0, tmp_path / "universal", seed=42, r=4, alpha=4)
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router="modula", universal=uni)
    peft_model = PeftModel.from_pretrained(tiny_llama(0), uni, adapter_name="universal")
    peft_model.load_adapter(adapters["sort"], adapter_name="sort")
    peft_model.base_model.set_adapter(["universal", "sort"])
    peft_model.eval()
    ids, mask = batch(11)
    ref = logits(peft_model, ids, mask)
    assert_differs(ref, logits(PeftModel.from_pretrained(tiny_llama(0), adapters["sort"]).eval(), ids, mask))
    assert_close(logits(mm, ids, mask, expert_weights=one_hot(3, 3, 1)), ref)
    only_universal = PeftModel.from_pretrained(tiny_llama(0), uni).eval()
    assert_close(logits(mm, ids, mask, expert_weights=torch.zeros(3)), logits(only_universal, ids, mask))


def res_expert(name, universal: Expert, seed: int) -> Expert:
    """A MoDULA-Res expert: A reads the universal output, so A is [r, d_out]."""
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(2, b.shape[0], generator=g) * 0.1 for m, b in universal.lora_B.items()}
    B = {m: torch.randn(b.shape[0], 2, generator=g) * 0.1 for m, b in universal.lora_B.items()}
    config = LoraConfig(r=2, lora_alpha=2, target_modules=sorted(A))  # scaling alpha / r = 1
    return Expert(name, config, A, B, {m: 1.0 for m in A}, variant="res")


def test_res_variant_applies_experts_to_universal_output_and_round_trips(tmp_path):
    uni = Expert.from_dir("universal", make_adapter(0, tmp_path / "u", seed=5, r=4, alpha=8))
    bank = ExpertBank({"a": res_expert("a", uni, 1), "b": res_expert("b", uni, 2)})
    mm = MixtureModel(tiny_llama(0), bank, "modula", universal=uni, variant="res")
    ids, mask = batch(12)
    with_a = logits(mm, ids, mask, expert_weights=one_hot(3, 2, 0))
    assert_differs(with_a, logits(mm, ids, mask, expert_weights=torch.zeros(2)), min_diff=1e-4)
    mm.save_pretrained(tmp_path / "res")
    loaded = MixtureModel.from_pretrained(tmp_path / "res", base_model=tiny_llama(0))
    assert loaded.variant == "res"
    assert torch.equal(logits(loaded, ids, mask, expert_weights=one_hot(3, 2, 0)), with_a)
