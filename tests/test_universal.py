"""MoDULA: Flan routes the universal LoRA as one more expert (equals PEFT with both adapters active);
Res feeds experts the universal trunk's output, is trained through the mixture layer and round-trips."""

import torch
from helpers import assert_close, assert_differs, logits, one_hot
from peft import LoraConfig, PeftModel
from tiny import batch, make_adapter, tiny_llama

from loramix import Expert, ExpertBank, MixtureModel
from loramix.config import ExpertConfig
from loramix.data import batches
from loramix.loops import train_expert
from loramix.trainees import ResTrainee, save_trainee


def test_flan_universal_plus_expert_equals_peft_both_active(adapters, tmp_path):
    uni = make_adapter(0, tmp_path / "universal", seed=42, r=4, alpha=4)
    mm = MixtureModel.from_adapters(tiny_llama(0), {"universal": uni, **adapters}, router="modula")
    assert mm.expert_names == ["universal", "reverse", "sort", "shift"]
    peft_model = PeftModel.from_pretrained(tiny_llama(0), uni, adapter_name="universal")
    peft_model.load_adapter(adapters["sort"], adapter_name="sort")
    peft_model.base_model.set_adapter(["universal", "sort"])
    peft_model.eval()
    ids, mask = batch(11)
    ref = logits(peft_model, ids, mask)
    assert_differs(ref, logits(PeftModel.from_pretrained(tiny_llama(0), adapters["sort"]).eval(), ids, mask))
    both = torch.tensor([1.0, 0.0, 1.0, 0.0])  # the universal and `sort`, each at gate 1
    assert_close(logits(mm, ids, mask, expert_weights=both), ref)
    only_universal = PeftModel.from_pretrained(tiny_llama(0), uni).eval()
    assert_close(logits(mm, ids, mask, expert_weights=one_hot(3, 4, 0)), logits(only_universal, ids, mask))


def res_expert(name, universal: Expert, seed: int) -> Expert:
    """A MoDULA-Res expert: A reads the universal output, so A is [r, d_out]."""
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(2, b.shape[0], generator=g) * 0.1 for m, b in universal.lora_B.items()}
    B = {m: torch.randn(b.shape[0], 2, generator=g) * 0.1 for m, b in universal.lora_B.items()}
    config = LoraConfig(r=2, lora_alpha=2, target_modules=sorted(A))  # scaling alpha / r = 1
    return Expert(name, config, A, B, {m: 1.0 for m in A}, variant="res")


def test_res_routes_the_trunk_alone_and_round_trips(tmp_path):
    uni = Expert.from_dir("universal", make_adapter(0, tmp_path / "u", seed=5, r=4, alpha=8))
    bank = ExpertBank({"a": res_expert("a", uni, 1), "b": res_expert("b", uni, 2)})
    mm = MixtureModel(tiny_llama(0), bank, "modula", universal=uni, variant="res", null_experts=["universal"])
    assert mm.expert_names == ["universal", "a", "b"]
    ids, mask = batch(12)
    with_a = logits(mm, ids, mask, expert_weights=one_hot(3, 3, 1))
    trunk_alone = logits(mm, ids, mask, expert_weights=one_hot(3, 3, 0))
    assert_differs(with_a, trunk_alone, min_diff=1e-4)
    # the null slot is the trunk alone: the universal LoRA as plain PEFT computes it
    peft_universal = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "u")).eval()
    assert_close(trunk_alone, logits(peft_universal, ids, mask))
    mm.save_pretrained(tmp_path / "res")
    assert sorted(p.name for p in (tmp_path / "res" / "experts").iterdir()) == ["a", "b"]
    loaded = MixtureModel.from_pretrained(tmp_path / "res", base_model=tiny_llama(0))
    assert loaded.variant == "res" and loaded.expert_names == ["universal", "a", "b"]
    assert torch.equal(logits(loaded, ids, mask, expert_weights=one_hot(3, 3, 1)), with_a)


def test_res_expert_trains_through_the_mixture_layer(tmp_path):
    """Stage 2 of MoDULA-Res: only the new expert's A and B train, the base and trunk stay frozen,
    the loss falls, and the saved expert in a mixture reproduces the trainee's output."""
    from tiny import VOCAB

    uni_dir = make_adapter(0, tmp_path / "u", seed=5, r=4, alpha=8, b_scale=0.5)
    g = torch.Generator().manual_seed(0)
    rows = []
    from loramix.data import Example

    for _ in range(32):
        ids = torch.randint(3, VOCAB, (8,), generator=g).tolist()
        ids[4:] = ids[:4]  # learnable: copy the prompt
        rows.append(Example(ids, [-100] * 4 + ids[4:], 0, 4))
    cfg = ExpertConfig(rank=4, alpha=8, steps=25, batch_size=8, lr=2e-2, warmup_ratio=0.0, patience=0)
    seen = []
    base = tiny_llama(0)
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    model, summary = train_expert(
        cfg, base, batches(rows, 8, 0, steps=25), report=lambda m, c: seen.append(m), trunk=uni_dir
    )
    assert isinstance(model, ResTrainee)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(summary["losses"][-5:]) < sum(summary["losses"][:5])
    for name, p in model.mixture.base_model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(p, frozen[key]), name
    save_trainee(model, tmp_path / "expert")
    expert = Expert.from_dir("e", tmp_path / "expert", variant="res")
    assert all(a.shape[1] == expert.lora_B[m].shape[0] for m, a in expert.lora_A.items())  # A reads d_out
    mm = MixtureModel(
        tiny_llama(0), ExpertBank({"e": expert}), None, universal=Expert.from_dir("universal", uni_dir), variant="res"
    )
    ids, mask = batch(3)
    model.eval()
    assert_close(logits(mm, ids, mask, expert_weights=torch.ones(1)), logits(model, ids, mask), atol=1e-5)


def test_res_mixture_saves_reloads_and_serves_both_ways(tmp_path):
    """A Res mixture round-trips through save/load and serves like `generate`: fused (routed by the
    router) and as one pinned expert (a Res expert cannot be merged into the base's weights)."""
    from loramix.serving import Engine, GenerationRequest, SamplingParams
    from loramix.synthetic import build_tokenizer

    uni = Expert.from_dir("universal", make_adapter(0, tmp_path / "u", seed=5, r=4, alpha=8))
    bank = ExpertBank({"a": res_expert("a", uni, 1), "b": res_expert("b", uni, 2)})
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    mm = MixtureModel(base, bank, "modula", universal=uni, variant="res", null_experts=["universal"], top_k=1)
    with torch.no_grad():
        for p in mm.router.parameters():
            p.normal_(0, 0.5)
    mm.save_pretrained(tmp_path / "res", base_path=str(tmp_path / "base"))
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path / "res" / "tokenizer")
    loaded = MixtureModel.from_pretrained(tmp_path / "res").eval()
    prompt = [tok.bos_token_id, *tok("reverse hello=", add_special_tokens=False)["input_ids"]]
    ids = torch.tensor([prompt])
    params = SamplingParams(max_tokens=6)
    fused = Engine.from_artifact(tmp_path / "res", device="cpu")
    want = loaded.generate(input_ids=ids, max_new_tokens=6, pad_token_id=tok.pad_token_id)[0, len(prompt) :]
    got = fused.complete([GenerationRequest(prompt, params)])[0]
    assert got.token_ids == want.tolist()[: len(got.token_ids)] and got.route is not None
    for i, name in enumerate(loaded.expert_names):
        pinned = Engine.from_artifact(tmp_path / "res", expert=name, device="cpu")
        weights = torch.zeros(1, 3)
        weights[0, i] = 1.0
        want = loaded.generate(input_ids=ids, max_new_tokens=6, expert_weights=weights, pad_token_id=tok.pad_token_id)
        got = pinned.complete([GenerationRequest(prompt, params)])[0]
        assert got.token_ids == want[0, len(prompt) :].tolist()[: len(got.token_ids)], name
