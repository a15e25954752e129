"""Saving and loading a mixture artifact.

<path>/manifest.json            expert order (gate columns), null experts, variant, router, base model
<path>/experts/<name>/          PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
<path>/universal/               the MoDULA-Res trunk (PEFT format), if any
<path>/router/config.json       router recipe and constructor kwargs
<path>/router/router.safetensors
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loramix.artifact import atomic_dir, read_json, write_json
from loramix.experts import Expert, ExpertBank
from loramix.versions import verify

logger = logging.getLogger(__name__)

ROUTER_WEIGHTS = "router/router.safetensors"
FORMAT = "loramix-mixture"
VERSION = 2  # 2: MoDULA-Flan universal as an expert, Res trunk + null experts, MoLE gates on LoRA outputs


def save_mixture(mm, path: str | Path, *, base_path: str | None = None) -> None:
    path = Path(path)
    if base_path is None:
        base_path = getattr(mm.base_model, "name_or_path", None) or None
    with atomic_dir(path) as tmp:
        for name, expert in mm.experts().items():
            expert.save(tmp / "experts" / name)
        if mm.universal is not None:
            mm.universal.save(tmp / "universal")
        router = None
        if mm.router is not None:
            router = {"recipe": mm.router.recipe, "top_k": mm.router.top_k, "kwargs": mm.router.config()}
            router["masked"] = [n for n, m in zip(mm.expert_names, mm.router.masked.tolist()) if m]
            (tmp / "router").mkdir()
            write_json(tmp / "router" / "config.json", router)
            state = {k: v.detach().contiguous().cpu() for k, v in mm.router.state_dict().items()}
            save_file(state, str(tmp / ROUTER_WEIGHTS), metadata={"format": "pt"})
        write_json(
            tmp / "manifest.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "expert_names": mm.expert_names,
                "null_experts": mm.null_experts,
                "variant": mm.variant,
                "universal": mm.universal is not None,
                "router": router,
                "base_model": base_path,
            },
        )
    logger.info("saved mixture of %d experts to %s", len(mm.expert_names), path)


def read_router(path: str | Path) -> tuple[list[str], dict]:
    """``(expert names, router weights)`` of the mixture artifact at ``path`` (a router warm start)."""
    path = Path(path)
    manifest = read_manifest(path)
    if not manifest.get("router"):
        raise ValueError(f"{str(path)!r} has no router to start from.")
    return manifest["expert_names"], load_file(str(path / ROUTER_WEIGHTS))


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a loramix mixture: manifest.json is missing.")
    manifest = read_json(path / "manifest.json")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{str(path / 'manifest.json')!r} is format {manifest.get('format')!r} v{manifest.get('version')}; "
            f"this loramix reads {FORMAT!r} v{VERSION}. Rerun `loramix run` on the same output to rebuild it "
            "(finished experts are reused)."
        )
    return manifest


def resolve_base(name_or_path: str, root: Path) -> str:
    """The base a manifest names: a path relative to the artifact, an absolute path or a hub id."""
    local = Path(root) / name_or_path
    return str(local) if local.is_dir() else name_or_path


def load_base(name_or_path: str, root: Path, **kwargs):
    """Load the base a manifest names; relative paths are resolved against the artifact."""

    return AutoModelForCausalLM.from_pretrained(resolve_base(name_or_path, root), **kwargs)


def load_mixture(cls, path: str | Path, base_model=None, **base_kwargs):

    path = Path(path)
    manifest = read_manifest(path)
    verify(path)  # a published version: every file as its manifest recorded it
    if base_model is None:
        if not manifest.get("base_model"):
            raise ValueError(f"{str(path)!r} names no base model; pass `base_model=`.")
        base_model = load_base(manifest["base_model"], path, **base_kwargs)
    variant = manifest["variant"]
    null = manifest.get("null_experts", [])
    names = [n for n in manifest["expert_names"] if n not in null]
    bank = ExpertBank.from_dirs({n: path / "experts" / n for n in names}, variant=variant)
    universal = Expert.from_dir("universal", path / "universal") if manifest["universal"] else None
    router = manifest["router"]
    mm = cls(
        base_model,
        bank,
        router["recipe"] if router else None,
        top_k=router["top_k"] if router else 1,
        universal=universal,
        variant=variant,
        null_experts=null,
        router_kwargs=router["kwargs"] if router else None,
    )
    if router:
        state = load_file(str(path / ROUTER_WEIGHTS))
        try:
            mm.router.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"router weights in {str(path)!r} do not fit the {router['recipe']!r} router: {err}"
            ) from None
        if router.get("masked"):
            mm.mask_experts(router["masked"])
    return mm
