"""Experts trained elsewhere: a PEFT LoRA brought into a run (``data.domains[].adapter``,
``loramix add-expert``) is checked against the run's base before anything uses it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM

from loramix.artifact import atomic_dir
from loramix.experts import CONFIG_FILE, WEIGHTS_FILE, Expert, ExpertBank
from loramix.messages import Context, LoraResult

if TYPE_CHECKING:  # the graph imports this module to run its stage
    from loramix.plan import AdapterStage


def same_base(declared: str, base: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names ``base`` (the same hub id, or a
    folder that resolves to the same place)."""
    if declared == base:
        return True
    return Path(declared).exists() and Path(base).exists() and Path(declared).resolve() == Path(base).resolve()


def copy_adapter(src: str | Path, dst: str | Path) -> None:
    """Copy an adapter's two files (config + safetensors, nothing else) to ``dst``, atomically."""
    with atomic_dir(dst) as tmp:
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(Path(src) / f, tmp / f)


def check_adapter(name: str, path: str | Path, base: str, *, variant: str = "flan") -> Expert:
    """Load the PEFT LoRA at ``path`` as expert ``name`` and check it against ``base`` (a folder or
    hub id) without reading the base's weights.

    Raises:
        ValueError / FileNotFoundError: naming the adapter and the problem (not a LoRA, pickle
            weights only, unsupported options, another base, modules or shapes the base lacks).
    """
    where = f"expert {name!r} adapter {str(path)!r}"
    if variant == "res":
        raise ValueError(f"{where}: MoDULA-Res experts read the universal trunk's output; one trained elsewhere can't.")
    expert = Expert.from_dir(name, path)
    declared = LoraConfig.from_pretrained(str(path)).base_model_name_or_path
    if declared and not same_base(declared, base):
        raise ValueError(
            f"{where} was trained on {declared!r}, but this run's base is {base!r}. If they are the same "
            f"weights, set `base_model_name_or_path` in its adapter_config.json to {base!r}."
        )
    with torch.device("meta"):  # shapes only: no weights are read
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    try:
        ExpertBank({name: expert}).check_base(skeleton)
    except ValueError as err:
        raise ValueError(f"{where} does not fit this run's base: {err}") from None
    return expert


def adapter_stage(ctx: Context, stage: AdapterStage, inputs: dict) -> LoraResult:
    """Check an adapter trained elsewhere against this run's base, then copy it in as the expert."""
    t0 = time.perf_counter()
    name = stage.name.split("/", 1)[1]
    res = ctx.cfg.universal.enabled and ctx.cfg.universal.variant == "res"
    expert = check_adapter(name, stage.adapter, inputs["base"].base, variant="res" if res else "flan")
    out = ctx.out / stage.out_dir
    copy_adapter(stage.adapter, out)
    return LoraResult(
        path=str(out),
        steps=0,
        max_steps=0,
        final_loss=None,
        seconds=time.perf_counter() - t0,
        losses=[],
        trainable_params=sum(expert.lora_A[m].numel() + expert.lora_B[m].numel() for m in expert.modules),
        data=f"adapter {stage.adapter} (trained elsewhere)",
        stopped="adapter",
    )
