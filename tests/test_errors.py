"""Every user-causable problem is a clear error naming the thing and the fix."""

import json

import pytest
import torch
from tiny import make_adapter, tiny_llama

from loramix import ExpertBank, MixtureModel
from loramix.names import check_expert_name


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "white space", "x" * 65, "é"])
def test_unsafe_names_rejected(name):
    with pytest.raises(ValueError, match="invalid expert name"):
        check_expert_name(name)


def test_non_string_name_rejected():
    with pytest.raises(TypeError, match="must be a string"):
        check_expert_name(3)


def test_names_with_dots_and_dashes_work(adapters):
    mm = MixtureModel.from_adapters(
        tiny_llama(0), {"v1.2-math": adapters["sort"], "b_c": adapters["reverse"]}, router="modula"
    )
    assert mm.expert_names == ["v1.2-math", "b_c"]


def test_unsafe_name_in_from_adapters(adapters):
    with pytest.raises(ValueError, match="invalid expert name '../x'"):
        MixtureModel.from_adapters(tiny_llama(0), {"../x": adapters["sort"]})


def test_missing_directory_and_files(tmp_path, adapters):
    with pytest.raises(FileNotFoundError, match="adapter directory .* does not exist"):
        ExpertBank.from_dirs({"a": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json' is missing"):
        ExpertBank.from_dirs({"a": tmp_path / "empty"})
    (tmp_path / "empty" / "adapter_config.json").write_text(open(f"{adapters['sort']}/adapter_config.json").read())
    (tmp_path / "empty" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="Pickle files are not loaded"):
        ExpertBank.from_dirs({"a": tmp_path / "empty"})


def test_adapter_from_another_base_rejected(adapters):
    with pytest.raises(
        ValueError,
        match=r"expert 'a': 7 adapted modules do not exist in the base model \(e\.g\. "
        r"'model\.layers\.1\.mlp\.down_proj'\)(.|\n)*expert 'b'",
    ):
        MixtureModel.from_adapters(tiny_llama(0, layers=1), {"a": adapters["sort"], "b": adapters["reverse"]})


def test_shape_mismatch_rejected(tmp_path, adapters):
    path = tmp_path / "wide"
    make_adapter(0, path, seed=1, r=4)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("q_proj.lora_A.weight"))
    sd[key] = torch.zeros(4, 32)
    save_file(sd, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj' has A \(4, 32\).*was it trained on another base"):
        MixtureModel.from_adapters(tiny_llama(0), {"wide": path})


def test_unsupported_lora_options_rejected(tmp_path):
    path = make_adapter(0, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(ValueError, match=r"LoRA options \['use_dora'\] are not supported"):
        ExpertBank.from_dirs({"d": path})


def test_non_lora_adapter_rejected(tmp_path, adapters):
    cfg = json.loads(open(f"{adapters['sort']}/adapter_config.json").read())
    cfg["peft_type"] = "IA3"
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is a IA3 adapter; only LoRA"):
        ExpertBank.from_dirs({"x": tmp_path / "ia3"})


def test_bad_expert_weights(adapters):
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router=None)
    ids = torch.randint(3, 100, (2, 4))
    with pytest.raises(ValueError, match=r"shape \[batch=2, n_experts=3\] in the order \['reverse', 'sort', 'shift'\]"):
        mm(input_ids=ids, expert_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        mm(input_ids=ids, expert_weights=torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="no router: pass `expert_weights`"):
        mm(input_ids=ids)


def test_bad_router_settings(adapters):
    with pytest.raises(ValueError, match=r"`top_k` must be in \[1, 3\]"):
        MixtureModel.from_adapters(tiny_llama(0), adapters, router="moa", top_k=4)
    with pytest.raises(ValueError, match="unknown router 'switch'"):
        MixtureModel.from_adapters(tiny_llama(0), adapters, router="switch")
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router="mole")
    with pytest.raises(ValueError, match=r"cannot mask unknown experts \['nope'\]"):
        mm.mask_experts(["nope"])
    with pytest.raises(ValueError, match="cannot mask every expert"):
        mm.mask_experts(["reverse", "sort", "shift"])


def test_peft_model_as_base_rejected(adapters):
    from peft import PeftModel

    with pytest.raises(TypeError, match="is a PeftModel"):
        MixtureModel.from_adapters(PeftModel.from_pretrained(tiny_llama(0), adapters["sort"]), adapters)


def test_not_a_mixture_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a loramix mixture: manifest.json is missing"):
        MixtureModel.from_pretrained(tmp_path)
