"""Put experts into a base model: swap each adapted ``nn.Linear`` for a :class:`MixtureLinear`."""

from __future__ import annotations

import logging

from torch import nn

from loramix.experts import Expert, ExpertBank
from loramix.layers import MixtureLinear, share_shrinks
from loramix.routing import Routing

logger = logging.getLogger(__name__)


def find_blocks(model: nn.Module) -> list[str]:
    """Module paths of the transformer blocks (the longest ``nn.ModuleList`` of the model)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        lists = [(name, m) for name, m in lists if len(m) == n] or lists
    if not lists:
        return []
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" if name else str(i) for i in range(len(blocks))]


def block_of(key: str, blocks: list[str]) -> int | None:
    for i, prefix in enumerate(blocks):
        if key.startswith(prefix + "."):
            return i
    return None


def inject(
    model: nn.Module,
    bank: ExpertBank,
    routing: Routing,
    *,
    expert_names: list[str] | None = None,
    universal: Expert | None = None,
    variant: str = "flan",
) -> dict[str, MixtureLinear]:
    """Replace every module adapted by some expert with a :class:`MixtureLinear`, in place.

    Args:
        expert_names: the gate columns (default ``bank.names``); names not in the bank are
            routed slots that own no ranks (MoDULA-Res's "universal alone").
        universal: the MoDULA-Res trunk (``variant="res"``).

    Returns:
        module path -> the new layer, in the base model's module order.

    Raises:
        ValueError: if the model already holds adapters, or experts do not fit it (one message).
    """
    if any(isinstance(m, MixtureLinear) for m in model.modules()):
        raise ValueError("this model already holds a mixture; load a fresh base model.")
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("this model holds PEFT LoRA layers; pass the plain base (`peft_model.unload()`).")
    bank.check_base(model)
    if (universal is None) != (variant != "res"):
        raise ValueError("a universal trunk goes with `variant='res'` (MoDULA-Res) and only with it.")
    if universal is not None:
        ExpertBank({universal.name: universal}).check_base(model)
        missing = sorted(set(bank.modules) - set(universal.modules))
        if missing:
            raise ValueError(f"MoDULA-Res experts read the universal LoRA's output, but it does not adapt {missing}.")
    blocks = find_blocks(model)
    names = list(expert_names or bank.names)
    wanted = set(bank.modules) | set(universal.modules if universal else [])
    keys = [name for name, _ in model.named_modules() if name in wanted]
    layers = {}
    for key in keys:
        parent_name, _, attr = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base_layer = getattr(parent, attr)
        if key in bank.modules:
            A, B, owner, scale = bank.stack(key, names)
        else:
            A = base_layer.weight.new_zeros(0, base_layer.in_features)
            B = base_layer.weight.new_zeros(base_layer.out_features, 0)
            owner, scale = A.new_zeros(0).long(), A.new_zeros(0)
        uni = None
        if universal is not None and key in universal.lora_A:
            uni = (universal.lora_A[key], universal.lora_B[key], universal.scaling[key])
        layers[key] = MixtureLinear(
            base_layer,
            A,
            B,
            owner,
            scale,
            key=key,
            block=block_of(key, blocks),
            routing=routing,
            n_experts=len(names),
            universal=uni,
            variant=variant,
        )
        setattr(parent, attr, layers[key])
    expected = sum(e.lora_A[m].numel() + e.lora_B[m].numel() for e in bank.experts.values() for m in e.modules)
    got = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers.values())
    if got != expected:  # an invariant, not user input: stacking lost or duplicated ranks
        raise RuntimeError(f"injected {got:,} expert parameters but the experts hold {expected:,}.")
    share_shrinks(layers)
    logger.info("injected %d experts into %d modules (%s expert parameters)", len(bank.names), len(layers), f"{got:,}")
    return layers
