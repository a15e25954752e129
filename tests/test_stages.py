"""The stage bodies in-process (the Ray-free demo), on a real-model path: a base saved to disk."""

import json

import pytest

from loramix import stages, synthetic
from loramix.config import build_config
from loramix.demo import run_demo
from loramix.model import MixtureModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """A tiny base + tokenizer written with save_pretrained: loaded back like any hub model."""
    root = tmp_path_factory.mktemp("base")
    tok = synthetic.build_tokenizer()
    synthetic.build_base(tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_demo_runs_every_stage_on_a_saved_base(saved_base, tmp_path):
    info = synthetic.write_demo_data(tmp_path / "data", ["reverse", "shift"], train_size=32, eval_size=4)
    cfg = build_config(
        {
            "model": {"base": str(saved_base)},
            "data": {"max_length": 32, "domains": info["domains"]},
            "expert": {"rank": 2, "steps": 3, "batch_size": 8},
            "router": {"steps": 3, "batch_size": 8},
        }
    )
    report = run_demo(cfg, tmp_path / "out")
    assert set(report["methods"]) == set(stages.METHODS)
    # the same training keys as `loramix run`, and the multitask baseline gets N x expert.steps
    assert report["training"]["multitask_lora"]["steps"] == 6
    assert report["training"]["expert/reverse"]["steps"] == 3 and report["training"]["expert/shift"]["steps"] == 3
    manifest = json.loads((tmp_path / "out" / "artifact" / "manifest.json").read_text())
    assert manifest["base_model"] == str(saved_base.resolve())
    mm = MixtureModel.from_pretrained(tmp_path / "out" / "artifact")
    assert mm.expert_names == ["reverse", "shift"]
    assert (tmp_path / "out" / "report.md").read_text().startswith("recipe `moa`")


def test_missing_eval_split_is_named(saved_base, tmp_path):
    info = synthetic.write_demo_data(tmp_path, ["reverse"], train_size=4, eval_size=2)
    cfg = build_config(
        {
            "model": {"base": str(saved_base)},
            "data": {"domains": [{"name": "reverse", "train": info["domains"][0]["train"]}]},
        }
    )
    tok = stages.load_tokenizer(stages.prepare_base(cfg, tmp_path / "unused"))
    with pytest.raises(ValueError, match=r"domain 'reverse' has no `eval` file; set `data.domains\[0\].eval`"):
        stages.domain_examples(cfg, tok, "eval")


def test_demo_trains_the_universal_lora_under_the_experts(saved_base, tmp_path):
    """`universal.enabled` (MoDULA): the demo trains the universal LoRA first and every expert on
    top of it, frozen, as `loramix run` does; the oracle and merges keep it under the experts."""
    import torch
    from safetensors.torch import load_file

    info = synthetic.write_demo_data(tmp_path / "data", ["reverse", "shift"], train_size=32, eval_size=4)
    cfg = build_config(
        {
            "recipe": "modula",
            "model": {"base": str(saved_base)},
            "data": {"max_length": 32, "domains": info["domains"]},
            "expert": {"rank": 2, "steps": 3, "batch_size": 8},
            "universal": {"enabled": True, "steps": 2},
            "router": {"steps": 2, "batch_size": 8, "top_k": 2},
        }
    )
    out = tmp_path / "out"
    report = run_demo(cfg, out)
    assert report["training"]["universal"]["steps"] == 2
    assert "error" not in report["methods"]["merge_linear"] and "error" not in report["methods"]["oracle"]
    universal = load_file(out / "universal" / "adapter_model.safetensors")
    expert = load_file(out / "experts" / "reverse" / "adapter_model.safetensors")
    # each folder holds one LoRA (the expert's own, not the frozen universal one under it)
    assert universal.keys() == expert.keys() and all(not torch.equal(universal[k], expert[k]) for k in expert)
    assert json.loads((out / "artifact" / "manifest.json").read_text())["universal"] is True
    oracle = stages.method_models(
        "oracle", cfg, {"base": str(saved_base)}, {"reverse": str(out / "experts" / "reverse")},
        artifact=None, multitask=None, universal=str(out / "universal"),
    )("reverse")  # fmt: skip
    assert oracle.model.universal is not None
