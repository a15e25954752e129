"""Training loops: plain functions over a model, batches and an optimizer stepper.

Loops never read globals or the environment. ``report(metrics, ckpt_dir | None)`` is passed in
(Ray shells pass a wrapper of ``ray.train.report``; tests pass ``lambda m, c: seen.append(m)``).
The optimizer is behind a :class:`Stepper` (``backward``, ``step``, ``lr``), so the same loop
runs with a torch AdamW here and a DeepSpeed engine in ``actors/``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loramix.config import OptimConfig, RouterConfig

logger = logging.getLogger(__name__)

Report = Callable[[dict, "str | None"], None]
LossFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict]"]


class Stepper(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> float: ...  # returns the gradient norm before clipping
    def lr(self) -> float: ...


def accelerator() -> torch.device:
    """Where in-process stages put their model: the GPU Ray assigned this task (or the first one), else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_of(model) -> torch.device:
    """The device of a module's parameters (a wrapper with ``.model`` is looked through)."""
    for m in (model, getattr(model, "model", None)):
        if isinstance(m, nn.Module):
            for p in m.parameters():
                return p.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch's tensors (data loaders build them on the CPU) to ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def warmup_cosine(cfg: OptimConfig) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup_ratio * steps``, then cosine to 10%."""
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def adamw(params: list[nn.Parameter], cfg: OptimConfig):
    """``(AdamW, its warmup/cosine LambdaLR)``: the optimiser of every LoRA and router."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))


class TorchStepper:
    """AdamW + warmup/cosine + global-norm clipping over ``params``."""

    def __init__(self, params: Iterable[nn.Parameter], cfg: OptimConfig):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad.")
        self.cfg = cfg
        self.optimizer, self.scheduler = adamw(self.params, cfg)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def run_steps(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: LossFn,
    stepper: Stepper,
    *,
    report: Report,
    log_every: int = 10,
    start_step: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Optimise ``loss_fn`` over ``batches``; report ``loss, lr, tokens_per_s, grad_norm`` (+ extras).

    Returns:
        ``{"steps", "final_loss", "losses", "seconds"}`` (``final_loss``: mean of the last 10 steps).
    """
    model.train()
    device = device_of(model)
    losses: list[float] = []
    started = time.perf_counter()
    step = start_step
    for step, batch in enumerate(batches, start=start_step + 1):
        t0 = time.perf_counter()
        batch = to_device(batch, device)
        loss, extra = loss_fn(model, batch)
        stepper.backward(loss)
        grad_norm = stepper.step()
        losses.append(float(loss.detach()))
        tokens = int(batch["attention_mask"].sum())
        metrics = {
            "step": step,
            "loss": losses[-1],
            "lr": stepper.lr(),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
            **extra,
        }
        if step % log_every == 0 or step == start_step + 1:
            logger.info(
                "step %d | loss %.4f | lr %.2e | %.0f tok/s", step, losses[-1], metrics["lr"], metrics["tokens_per_s"]
            )
        report(metrics, None)
        if on_step is not None:
            on_step(step)
    model.eval()
    tail = losses[-10:]
    return {
        "steps": step,
        "final_loss": sum(tail) / max(len(tail), 1),
        "losses": losses,
        "seconds": time.perf_counter() - started,
    }


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Causal LM loss on the completion tokens (plain model, PEFT model, or mixture)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, {}


def prompt_mask(batch: dict) -> torch.Tensor:
    """Positions of real prompt tokens: routing may look only at what inference will see."""
    from loramix.data import IGNORE

    return batch["attention_mask"] * (batch["labels"] == IGNORE).long()


def router_loss_fn(recipe: str, expert_names: list[str], balance_coef: float) -> LossFn:
    """The loss a recipe trains its router with.

    - ``moa``: cross-entropy of the sequence router's logits against the domain label,
      computed on the prompt alone (the router never sees the completion at inference).
    - ``mole`` / ``modula``: LM loss of the routed mixture + ``balance_coef`` x balance loss.
    """

    def moa(mm, batch):
        mask = prompt_mask(batch)
        logits = mm.router.sequence_logits(mm, batch["input_ids"], mask)
        loss = F.cross_entropy(logits, batch["domain"])
        acc = (logits.argmax(-1) == batch["domain"]).float().mean()
        return loss, {"router_accuracy": float(acc), **_load_metrics(logits.softmax(-1), expert_names)}

    def lm_balance(mm, batch):
        out = mm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            route_mask=prompt_mask(batch),
        )
        loss = out.loss + balance_coef * out.aux_loss
        gates = out.gates.detach()
        acc = (gates.argmax(-1) == batch["domain"]).float().mean()
        return loss, {
            "lm_loss": float(out.loss.detach()),
            "router_accuracy": float(acc),
            **_load_metrics(gates, expert_names),
        }

    return moa if recipe == "moa" else lm_balance


def _load_metrics(gates: torch.Tensor, expert_names: list[str]) -> dict:
    gates = gates.detach().float()
    entropy = -(gates * gates.clamp_min(1e-9).log()).sum(-1).mean()
    load = gates.mean(0)
    return {"router_entropy": float(entropy), **{f"expert_load/{n}": float(v) for n, v in zip(expert_names, load)}}


def train_router(
    cfg: RouterConfig,
    mm,
    batches: Iterable[dict],
    *,
    report: Report,
    recipe: str,
    stepper: Stepper | None = None,
    log_every: int = 10,
) -> dict:
    """Train only the router of a :class:`~loramix.model.MixtureModel` (base and experts frozen)."""
    if mm.router is None:
        raise ValueError("this mixture has no router to train; build it with router='moa'|'mole'|'modula'.")
    frozen = [n for n, p in mm.named_parameters() if p.requires_grad and not n.startswith("router.")]
    if frozen:
        raise ValueError(f"only router parameters may train, but {frozen[:3]} require grad.")
    n_train = sum(p.numel() for p in mm.router.parameters())
    n_frozen = sum(p.numel() for p in mm.base_model.parameters())
    logger.info("router %s: %s trainable / %s frozen parameters", recipe, f"{n_train:,}", f"{n_frozen:,}")
    stepper = stepper or TorchStepper(mm.router.parameters(), cfg)
    loss_fn = router_loss_fn(recipe, mm.expert_names, cfg.balance_coef)
    return run_steps(mm, batches, loss_fn, stepper, report=report, log_every=log_every)


def lora_config(cfg, *, init_lora_weights: bool = True):
    """The PEFT ``LoraConfig`` of an expert or universal LoRA section."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        init_lora_weights=init_lora_weights,
    )


def build_peft_model(base, cfg, universal: str | None = None, *, adapter_name: str = "default"):
    """A PEFT model whose only trainable adapter is ``adapter_name``.

    With a MoDULA ``universal`` LoRA directory, that LoRA is loaded under the new one and frozen:
    the expert learns what the universal LoRA leaves to it (both active in the forward).
    """
    from peft import PeftModel, get_peft_model

    lora = lora_config(cfg)
    if universal is None:
        return get_peft_model(base, lora, adapter_name=adapter_name)
    model = PeftModel.from_pretrained(base, universal, adapter_name="universal")
    model.add_adapter(adapter_name, lora)
    model.base_model.set_adapter(["universal", adapter_name])  # marks both trainable; freeze universal below
    for name, p in model.named_parameters():
        p.requires_grad = f".{adapter_name}." in name
    return model


def train_expert(
    cfg,
    base_model: nn.Module,
    batches: Iterable[dict],
    *,
    report: Report,
    universal: str | None = None,
    stepper_factory: Callable[[nn.Module], Stepper] | None = None,
    log_every: int = 10,
):
    """Train one PEFT LoRA on ``base_model`` (modified in place; pass a copy to keep it).

    Args:
        cfg: an :class:`~loramix.config.ExpertConfig` (rank, alpha, targets, optimizer).
        universal: a MoDULA universal LoRA directory, frozen under the trained one.
        stepper_factory: builds the optimizer stepper from the PEFT model (DeepSpeed in shells).

    Returns:
        ``(peft_model, summary)``; save the trained adapter alone with
        ``peft_model.save_pretrained(dir, selected_adapters=["default"])``.
    """
    model = build_peft_model(base_model, cfg, universal)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("expert: %s trainable parameters (rank %d)", f"{n_train:,}", cfg.rank)
    stepper = stepper_factory(model) if stepper_factory else TorchStepper(model.parameters(), cfg)
    summary = run_steps(model, batches, lm_loss, stepper, report=report, log_every=log_every)
    return model, summary
