"""LoRA experts in PEFT's on-disk format, checked against a base and stacked per module.

An expert is a standard PEFT LoRA adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``), so any LoRA trained elsewhere can join a mixture and every
loramix expert loads in plain PEFT. Pickled ``adapter_model.bin`` files are refused.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from torch import nn

from loramix.names import check_expert_name

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# LoraConfig options that change the maths of a LoRA layer; an expert using one of them is
# refused instead of being silently mis-applied.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
}


@dataclass
class Expert:
    """One LoRA expert: per module ``A [r, d_in]``, ``B [d_out, r]`` and the scale ``alpha / r``.

    ``variant="res"`` marks a MoDULA-Res expert whose ``A`` reads the universal LoRA's output
    (``d_in`` = the module's ``d_out``); those are loramix-only and do not load in PEFT.
    """

    name: str
    config: LoraConfig
    lora_A: dict[str, torch.Tensor]  # module path -> [r, d_in]
    lora_B: dict[str, torch.Tensor]  # module path -> [d_out, r]
    scaling: dict[str, float] = field(default_factory=dict)
    variant: str = "flan"
    # PEFT saves a copy of a tied layer's base weight with its adapter (an `lm_head` LoRA on a
    # model with tied embeddings): kept to check it equals the base's, never mixed or saved.
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_A)

    @classmethod
    def from_dir(cls, name: str, path: str | Path, variant: str = "flan") -> Expert:
        """Load a PEFT LoRA adapter directory.

        Raises:
            FileNotFoundError: if the directory or one of its two files is missing.
            ValueError: if the adapter is not a plain LoRA loramix can mix (names the option).
        """
        name = check_expert_name(name)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"expert {name!r}: adapter directory {str(path)!r} does not exist.")
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"expert {name!r}: {str(path / CONFIG_FILE)!r} is missing; is this a PEFT adapter?")
        peft_type = json.loads((path / CONFIG_FILE).read_text()).get("peft_type")
        if peft_type != "LORA":
            raise ValueError(
                f"expert {name!r}: {str(path)!r} is a {peft_type} adapter; only LoRA adapters can be experts."
            )
        if not (path / WEIGHTS_FILE).is_file():
            hint = (
                " Pickle files are not loaded; re-save with safetensors."
                if (path / "adapter_model.bin").exists()
                else ""
            )
            raise FileNotFoundError(f"expert {name!r}: {str(path / WEIGHTS_FILE)!r} is missing.{hint}")
        config = LoraConfig.from_pretrained(str(path))
        return cls.from_state_dict(name, config, load_file(str(path / WEIGHTS_FILE)), variant=variant, source=str(path))

    @classmethod
    def from_state_dict(
        cls, name: str, config: LoraConfig, state: Mapping[str, torch.Tensor], variant: str = "flan", source: str = ""
    ) -> Expert:
        """Build an expert from a PEFT adapter state dict (keys ``base_model.model.<module>.lora_A.weight``)."""
        where = f"expert {name!r}" + (f" ({source})" if source else "")
        bad = [k for k, ok in _UNSUPPORTED.items() if getattr(config, k, ok) not in (ok, [], {}, False)]
        if bad:
            raise ValueError(
                f"{where}: LoRA options {bad} are not supported by loramix mixtures. Retrain without them."
            )
        lora_A, lora_B, copies = {}, {}, {}
        for key, tensor in state.items():
            module, _, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
            if kind == "A.weight":
                lora_A[module] = tensor
            elif kind == "B.weight":
                lora_B[module] = tensor
            elif key.endswith(".base_layer.weight"):
                copies[key.removeprefix(_PREFIX).removesuffix(".base_layer.weight")] = tensor
            else:
                raise ValueError(f"{where}: unexpected tensor {key!r}; only Linear LoRA A/B weights are supported.")
        if set(lora_A) != set(lora_B) or not lora_A:
            raise ValueError(f"{where}: every adapted module needs both lora_A and lora_B; found none or a half pair.")
        if set(copies) - set(lora_A):
            raise ValueError(f"{where}: base weights of {sorted(set(copies) - set(lora_A))} are not LoRA weights.")
        scaling = {}
        for module in lora_A:
            r = lora_A[module].shape[0]
            if lora_B[module].shape[1] != r:
                raise ValueError(f"{where}: {module} has lora_A rank {r} but lora_B {tuple(lora_B[module].shape)}.")
            scaling[module] = lora_scaling(config, module, r)
        return cls(name, config, lora_A, lora_B, scaling, variant, copies)

    def save(self, path: str | Path) -> None:
        """Write the expert as a PEFT adapter directory."""
        for module in self.modules:  # the file stores alpha, not the scale: they must agree
            implied = lora_scaling(self.config, module, self.lora_A[module].shape[0])
            if not math.isclose(implied, self.scaling[module], rel_tol=1e-6):
                raise ValueError(
                    f"expert {self.name!r}: scale {self.scaling[module]} on {module!r} differs from the "
                    f"{implied} its LoraConfig implies (alpha / r); fix `lora_alpha` before saving."
                )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for module in self.modules:
            state[f"{_PREFIX}{module}.lora_A.weight"] = self.lora_A[module].detach().contiguous().cpu()
            state[f"{_PREFIX}{module}.lora_B.weight"] = self.lora_B[module].detach().contiguous().cpu()
        self.config.save_pretrained(str(path))
        # PEFT writes `target_modules` (a set) in hash order, which differs between processes:
        # sorted, the same expert saves to the same bytes, so versions share unchanged experts.
        config = json.loads((path / CONFIG_FILE).read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def lora_scaling(config: LoraConfig, module: str, r: int) -> float:
    """PEFT's scale of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), honouring ``alpha_pattern``."""
    alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
    alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


class ExpertBank:
    """Named experts checked against a base model and each other.

    Experts may have different ranks, alphas and even adapt different modules: a module an
    expert does not adapt simply holds no rank for it.

    Args:
        experts: expert name -> :class:`Expert`. The order is the gate order (``expert_names``).
    """

    def __init__(self, experts: Mapping[str, Expert]):
        if not experts:
            raise ValueError("an ExpertBank needs at least one expert; pass {name: adapter_dir}.")
        for name, expert in experts.items():
            if name != expert.name:
                raise ValueError(f"expert registered as {name!r} is named {expert.name!r}; use one name.")
        self.experts = dict(experts)

    @classmethod
    def from_dirs(cls, adapters: Mapping[str, str | Path], variant: str = "flan") -> ExpertBank:
        if not isinstance(adapters, Mapping) or not adapters:
            raise TypeError("adapters must be a non-empty mapping {expert_name: adapter_dir}.")
        return cls({name: Expert.from_dir(name, path, variant) for name, path in adapters.items()})

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    @property
    def modules(self) -> list[str]:
        return sorted({m for e in self.experts.values() for m in e.modules})

    def check_base(self, base_model: nn.Module) -> None:
        """Raise one error listing every expert module that is missing from, or misfits, the base."""
        named = dict(base_model.named_modules())
        problems = []
        for expert in self.experts.values():
            missing = [m for m in expert.modules if m not in named]
            if missing:
                problems.append(
                    f"expert {expert.name!r}: {len(missing)} adapted modules do not exist in the base model "
                    f"(e.g. {missing[0]!r}); was it trained on another base?"
                )
            for module in expert.modules:
                layer = named.get(module)
                if layer is None:
                    continue
                if not isinstance(layer, nn.Linear):
                    problems.append(f"expert {expert.name!r}: {module!r} is {type(layer).__name__}; only nn.Linear")
                    continue
                copy = expert.base_copies.get(module)
                if copy is not None and not torch.equal(copy.to(layer.weight.dtype), layer.weight.detach().cpu()):
                    problems.append(
                        f"expert {expert.name!r}: carries its own {module!r} weights, which differ from the base's "
                        "(a mixture adds LoRA deltas to one shared base); was it trained on another base?"
                    )
                d_in = layer.out_features if expert.variant == "res" else layer.in_features
                a, b = expert.lora_A[module].shape, expert.lora_B[module].shape
                if a[1] != d_in or b[0] != layer.out_features:
                    problems.append(
                        f"expert {expert.name!r}: {module!r} has A {tuple(a)} / B {tuple(b)} but the base layer is "
                        f"{layer.in_features}->{layer.out_features}; was it trained on another base?"
                    )
        if problems:
            raise ValueError("experts do not fit the base model:\n  " + "\n  ".join(problems))

    def stack(
        self, module: str, order: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenate every expert's LoRA of one module along the rank dimension.

        Args:
            order: the gate columns the owners index (default :attr:`names`).

        Returns:
            ``A [R, d_in]``, ``B [d_out, R]``, ``expert_of_rank [R]`` (index into ``order``) and
            ``scale_of_rank [R]``, where ``R`` is the sum of the ranks adapting ``module``.
        """
        order = order or self.names
        As, Bs, owner, scale = [], [], [], []
        for expert in self.experts.values():
            if module not in expert.lora_A:
                continue
            i = order.index(expert.name)
            r = expert.lora_A[module].shape[0]
            As.append(expert.lora_A[module])
            Bs.append(expert.lora_B[module])
            owner += [i] * r
            scale += [expert.scaling[module]] * r
        return (
            torch.cat(As, 0),
            torch.cat(Bs, 1),
            torch.tensor(owner, dtype=torch.long),
            torch.tensor(scale, dtype=torch.float32),
        )
