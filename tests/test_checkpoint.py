"""Save / load round trips; saved experts load in plain PEFT; the base is found from the manifest."""

import json

import pytest
import torch
from helpers import assert_close, assert_differs, logits, one_hot
from peft import PeftModel
from tiny import batch, tiny_llama

from loramix import MixtureModel


@pytest.mark.parametrize("recipe", ["moa", "mole", "modula", None])
def test_round_trip_gives_identical_logits(adapters, tmp_path, recipe):
    torch.manual_seed(0)
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router=recipe, top_k=2)
    if mm.router is not None:
        with torch.no_grad():
            for p in mm.router.parameters():
                p.normal_(0, 0.3)
    ids, mask = batch(7)
    kw = {} if recipe else {"expert_weights": torch.tensor([0.2, 0.5, 0.3])}
    before = logits(mm, ids, mask, **kw)
    mm.save_pretrained(tmp_path / "mix")
    loaded = MixtureModel.from_pretrained(tmp_path / "mix", base_model=tiny_llama(0))
    assert loaded.expert_names == mm.expert_names
    assert torch.equal(logits(loaded, ids, mask, **kw), before)
    files = sorted(p.relative_to(tmp_path / "mix").as_posix() for p in (tmp_path / "mix").rglob("*") if p.is_file())
    expected = ["manifest.json"] + [
        f"experts/{n}/{f}" for n in mm.expert_names for f in ("adapter_config.json", "adapter_model.safetensors")
    ]
    if recipe:
        expected += ["router/config.json", "router/router.safetensors"]
    assert sorted(f for f in files if not f.endswith("README.md")) == sorted(expected)


def test_saved_expert_loads_in_plain_peft(adapters, tmp_path):
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router=None)
    mm.save_pretrained(tmp_path / "mix")
    ids, mask = batch(8)
    peft_model = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "mix" / "experts" / "sort")).eval()
    ref = logits(mm, ids, mask, expert_weights=one_hot(3, 3, 1))
    assert_differs(ref, logits(tiny_llama(0), ids, mask))
    assert_close(logits(peft_model, ids, mask), ref)


def test_base_loaded_from_manifest(adapters, tmp_path):
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router="moa")
    mm.save_pretrained(tmp_path / "mix", base_path=str(tmp_path / "base"))
    assert json.loads((tmp_path / "mix" / "manifest.json").read_text())["base_model"] == str(tmp_path / "base")
    loaded = MixtureModel.from_pretrained(tmp_path / "mix")  # base_model=None: from the manifest
    ids, mask = batch(9)
    assert torch.equal(logits(loaded, ids, mask), logits(mm, ids, mask))


def test_masked_experts_survive_save(adapters, tmp_path):
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router="mole", top_k=3)
    mm.mask_experts(["reverse"])
    mm.save_pretrained(tmp_path / "mix")
    loaded = MixtureModel.from_pretrained(tmp_path / "mix", base_model=tiny_llama(0))
    assert loaded.router.masked.tolist() == [True, False, False]
    ids, _ = batch(10)
    assert torch.all(loaded.route(input_ids=ids)[:, 0] == 0)


def test_bf16_base_keeps_float32_experts_lossless(adapters, tmp_path):
    from loramix.experts import Expert

    mm = MixtureModel.from_adapters(tiny_llama(0).to(torch.bfloat16), adapters, router=None)
    ids, mask = batch(15)
    out = logits(mm, ids, mask, expert_weights=one_hot(3, 3, 0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    mm.save_pretrained(tmp_path / "mix")
    for name, path in adapters.items():
        original, saved = Expert.from_dir(name, path), Expert.from_dir(name, tmp_path / "mix" / "experts" / name)
        assert all(torch.equal(saved.lora_A[m], original.lora_A[m]) for m in original.modules)
        assert all(saved.lora_A[m].dtype == torch.float32 for m in original.modules)


def test_an_expert_saves_to_the_same_bytes_in_every_process(adapters, tmp_path):
    """PEFT keeps `target_modules` as a set (hash order differs between processes); a saved
    expert is byte-stable, so a new version shares the bytes of every expert it did not change."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; sys.path[:0] = sys.argv[3:]\n"
        "from loramix.experts import Expert\n"
        "Expert.from_dir('sort', sys.argv[1]).save(sys.argv[2])\n"
    )
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        subprocess.run(
            [sys.executable, "-c", script, adapters["sort"], str(out), *sys.path],
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        outs.append({f.name: f.read_bytes() for f in out.iterdir()})
    assert outs[0] == outs[1]
    assert json.loads(outs[0]["adapter_config.json"])["target_modules"] == sorted(
        json.loads(outs[0]["adapter_config.json"])["target_modules"]
    )
