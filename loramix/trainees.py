"""What one LoRA trainer trains: a PEFT LoRA, or a MoDULA-Res expert through the mixture layer.

    model = build_trainee(base, cfg)                       # PEFT LoRA (experts, universal, multitask)
    model = build_trainee(base, cfg, trunk="universal/")   # MoDULA-Res expert on the frozen trunk
    ... train model (plain torch or a DeepSpeed engine) ...
    save_trainee(model, "experts/reverse")                 # a PEFT-format adapter directory

Both are ``nn.Module``\\ s whose forward takes ``input_ids, attention_mask, labels`` and returns
``.loss``, with only the new LoRA's parameters requiring grad.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loramix.experts import Expert, ExpertBank
from loramix.model import MixtureModel

ADAPTER = "default"


def lora_config(cfg, *, target_modules=None) -> LoraConfig:
    """The PEFT ``LoraConfig`` of an expert or universal LoRA section (``rank``, ``alpha``, ...)."""
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules if target_modules is not None else cfg.target_modules,
    )


def res_targets(trunk: Expert, target_modules) -> list[str]:
    """The trunk's modules a Res expert adapts: all of them (``all-linear``) or those named."""
    if target_modules == "all-linear":
        return trunk.modules
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = [m for m in trunk.modules if m.rsplit(".", 1)[-1] in names]
    if not chosen:
        raise ValueError(
            f"`expert.target_modules` {names} matches no module of the universal LoRA ({trunk.modules[:3]}...); "
            "MoDULA-Res experts read the universal LoRA's output, so they adapt only modules it adapts."
        )
    return chosen


def fresh_res_expert(name: str, trunk: Expert, cfg) -> Expert:
    """A new Res expert initialised as PEFT initialises a LoRA: ``A`` Kaiming-uniform, ``B = 0``.

    ``A`` reads the trunk's output, so it is ``[r, d_out]``.
    """
    modules = res_targets(trunk, cfg.target_modules)
    lora_A, lora_B = {}, {}
    for m in modules:
        d_out = trunk.lora_B[m].shape[0]
        a = torch.empty(cfg.rank, d_out)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's `init_lora_weights=True`
        lora_A[m], lora_B[m] = a, torch.zeros(d_out, cfg.rank)
    config = lora_config(cfg, target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}))
    scale = cfg.alpha / cfg.rank
    return Expert(name, config, lora_A, lora_B, {m: scale for m in modules}, variant="res")


class ResTrainee(nn.Module):
    """Stage 2 of MoDULA-Res: one domain expert trained through :class:`MixtureLinear` with the
    universal trunk frozen, ``y = W0 x + h + s B LeakyReLU(A h)``, ``h = s_u B_u A_u x`` (the
    layer the mixture serves with, at gate 1). PEFT cannot express ``A h``, hence this trainee.
    """

    def __init__(self, base_model: nn.Module, cfg, trunk: Expert, name: str = ADAPTER):
        super().__init__()
        expert = fresh_res_expert(name, trunk, cfg)
        self.name = name
        self.mixture = MixtureModel(base_model, ExpertBank({name: expert}), None, universal=trunk, variant="res")
        for layer in self.mixture.layers.values():
            if layer.ranks:
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
        expected = sum(a.numel() + expert.lora_B[m].numel() for m, a in expert.lora_A.items())
        got = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if got != expected:  # an invariant: the layer lost or duplicated ranks of the new expert
            raise RuntimeError(f"the Res trainee trains {got:,} parameters; its expert has {expected:,}.")

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        weights = torch.ones(input_ids.shape[0], 1, device=input_ids.device)
        return self.mixture(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, expert_weights=weights, **kwargs
        )

    def save_adapter(self, directory: str | Path) -> Path:
        self.mixture.experts()[self.name].save(directory)
        return Path(directory)


def build_trainee(base_model: nn.Module, cfg, *, trunk: str | Path | None = None, adapter_name: str = ADAPTER):
    """The model a LoRA trainer optimises; only the new LoRA requires grad.

    Args:
        cfg: an :class:`~loramix.config.ExpertConfig` (rank, alpha, targets, optimiser).
        trunk: a MoDULA-Res universal LoRA directory: train a Res expert on top of it.
    """
    if trunk is not None:
        return ResTrainee(base_model, cfg, Expert.from_dir("universal", trunk), adapter_name)

    return get_peft_model(base_model, lora_config(cfg), adapter_name=adapter_name)


def save_trainee(model, directory: str | Path) -> Path:
    """Write the trained LoRA as an adapter directory (``adapter_config.json`` + safetensors) at ``directory``."""
    directory = Path(directory)
    if isinstance(model, ResTrainee):
        return model.save_adapter(directory)
    name = model.active_adapter
    model.save_pretrained(str(directory), selected_adapters=[name])
    if name != "default":  # PEFT writes other adapters one folder down
        for f in (directory / name).iterdir():
            shutil.move(str(f), directory / f.name)
        (directory / name).rmdir()
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub: an expert is its two files
    return directory


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
