"""Experts trained elsewhere (`data.domains[].adapter`, `loramix add-expert`): a plain-PEFT LoRA
on the run's base is accepted and mixes like a trained one; anything else is refused, naming why."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from loramix import plan, synthetic
from loramix.adapters import check_adapter
from loramix.config import build_config
from loramix.demo import run_demo
from loramix.model import MixtureModel

pytestmark = pytest.mark.slow


def plain_peft_lora(base, out, *, base_name=None, targets=("q_proj", "v_proj"), seed=0):
    """A LoRA written by plain PEFT code, not by loramix (B randomised so it does something)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_name or base)
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "README.md").unlink(missing_ok=True)
    return out


def test_a_plain_peft_lora_on_the_same_base_is_accepted(saved_base, tmp_path):
    expert = check_adapter("ext", plain_peft_lora(saved_base, tmp_path / "lora"), str(saved_base))
    assert expert.config.r == 4 and expert.modules and all(m.endswith(("q_proj", "v_proj")) for m in expert.modules)


def test_bad_adapters_are_refused_naming_the_problem(saved_base, tmp_path):
    good = plain_peft_lora(saved_base, tmp_path / "good")
    with pytest.raises(ValueError, match=r"was trained on 'other/model', but this run's base is"):
        check_adapter("ext", plain_peft_lora(saved_base, tmp_path / "other", base_name="other/model"), str(saved_base))
    bin_only = shutil.copytree(good, tmp_path / "bin")
    torch.save(load_file(bin_only / "adapter_model.safetensors"), bin_only / "adapter_model.bin")
    (bin_only / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="Pickle files are not loaded; re-save with safetensors"):
        check_adapter("ext", bin_only, str(saved_base))
    no_config = shutil.copytree(good, tmp_path / "noconfig")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json' is missing; is this a PEFT adapter"):
        check_adapter("ext", no_config, str(saved_base))
    wrong = shutil.copytree(good, tmp_path / "shapes")
    state = load_file(wrong / "adapter_model.safetensors")
    state = {k: torch.zeros(v.shape[0], 48) if "lora_A" in k else v for k, v in state.items()}  # d_in 48, base 32
    save_file(state, wrong / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="does not fit this run's base"):
        check_adapter("ext", wrong, str(saved_base))
    with pytest.raises(ValueError, match="MoDULA-Res experts read the universal trunk"):
        check_adapter("ext", good, str(saved_base), variant="res")


def test_an_adapter_domain_is_copied_in_and_mixed_without_training(saved_base, tmp_path):
    info = synthetic.write_demo_data(tmp_path / "data", ["reverse", "shift"], train_size=48, eval_size=4)
    lora = plain_peft_lora(saved_base, tmp_path / "ext")
    info["domains"][1]["adapter"] = str(lora)
    data = {
        "model": {"base": str(saved_base)},
        "data": {"max_length": 32, "domains": info["domains"]},
        "expert": {"rank": 2, "steps": 4, "batch_size": 8, "patience": 0},
        "router": {"steps": 3, "batch_size": 8},
        "baselines": False,
    }
    cfg = build_config(data)
    stage = next(s for s in plan.build_plan(cfg) if s.name == "expert/shift")
    assert isinstance(stage, plan.AdapterStage)
    report = run_demo(cfg, tmp_path / "out")
    shift = report["training"]["expert/shift"]
    assert shift["steps"] == 0 and shift["stopped"] == "adapter" and shift["final_loss"] is None
    copied = tmp_path / "out" / "artifact" / "experts" / "shift" / "adapter_model.safetensors"
    assert copied.read_bytes() == (lora / "adapter_model.safetensors").read_bytes()
    mm = MixtureModel.from_pretrained(tmp_path / "out" / "artifact")
    assert mm.expert_names == ["reverse", "shift"]
    # pinned to the external expert, the mixture computes what PEFT computes with that adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), lora).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = mm(input_ids=ids, expert_weights=torch.tensor([[0.0, 1.0]])).logits
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # and served: both serving paths (its own merged replica, the fused mixture pinned to it)
    # decode PEFT's greedy tokens
    from loramix.serving import Engine, GenerationRequest, SamplingParams

    art = tmp_path / "out" / "artifact"
    prompt = [1, 5, 6, 7, 8]
    with torch.no_grad():
        want = peft_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    want = want[0, len(prompt) :].tolist()
    greedy = SamplingParams(max_tokens=6)
    for engine, weights in ((Engine.from_artifact(art, expert="shift"), None), (Engine.from_artifact(art), [0.0, 1.0])):
        (done,) = engine.complete([GenerationRequest(prompt, greedy, weights)])
        assert done.token_ids and done.token_ids == want[: len(done.token_ids)], (done.token_ids, want)
