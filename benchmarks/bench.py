"""``loramix bench``: how much a mixture costs over its base, and how it serves many experts.

Every figure is a ratio against a baseline timed in the same process, right after it (these
machines are noisy); nothing here asserts a speed. Sections:

1. forward overhead: mixture (8 experts, rank 16, top-2 per sequence) vs the base alone, with
   the theoretical extra FLOPs k*r*(d_in+d_out)/(d_in*d_out) of the adapted linears;
2. heterogeneous generation: every prompt wants another expert; loramix in one batch vs PEFT
   one request at a time with ``set_adapter`` and vs PEFT's mixed batch ``adapter_names``;
3. memory: bytes per extra expert in a fused replica vs a full copy of the model.

``--ray`` adds training (concurrent vs sequential experts, ZeRO 0/2/3) and serving (fused vs
routed throughput and latency against concurrency) on a local Ray: see :mod:`benchmarks.ray_bench`.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loramix import MixtureModel


@dataclass
class BenchConfig:
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    vocab: int = 2048
    experts: int = 8
    rank: int = 16
    top_k: int = 2
    batch: int = 8
    seq: int = 256
    prompts: int = 32
    new_tokens: int = 32
    repeats: int = 5
    device: str = "cpu"
    dtype: str = "float32"  # the base's; experts stay float32, as PEFT keeps them under a bf16 base

    @classmethod
    def preset(cls, size: str = "default", **over) -> BenchConfig:
        """``quick`` (CI, under 2 minutes), ``default`` (the issue's sizes), ``large`` (Llama-7B-shaped, for a GPU)."""
        sizes = {
            "quick": dict(
                hidden=256, intermediate=688, layers=2, vocab=512, seq=64, prompts=16, new_tokens=8, repeats=3
            ),
            "default": {},
            "large": dict(hidden=4096, intermediate=11008, layers=4, heads=32, vocab=32000, repeats=20),
        }
        if size not in sizes:
            raise ValueError(f"unknown benchmark size {size!r}; choose from {sorted(sizes)}.")
        return cls(**(sizes[size] | over))


def build(cfg: BenchConfig, root: Path):
    """``fresh()`` copies of one random base on ``cfg.device``, and ``cfg.experts`` random PEFT adapters on disk."""
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq + cfg.new_tokens + 8,
        pad_token_id=0,
    )
    with torch.device(cfg.device):  # initialise where it runs: a 7B-shaped block is slow to init on a CPU
        base = LlamaForCausalLM(llama).eval()
    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(base), lora, adapter_name="e0")
    for i in range(1, cfg.experts):
        peft.add_adapter(f"e{i}", lora)
    peft.save_pretrained(root)  # no adapter is named "default": each lands in root/<name>
    del peft
    base = base.to(getattr(torch, cfg.dtype))

    def fresh():
        return copy.deepcopy(base)

    return fresh, {f"e{i}": str(root / f"e{i}") for i in range(cfg.experts)}


def timed(fn, sync=lambda: None) -> float:
    """Seconds ``fn()`` takes; ``sync`` waits for queued device work (CUDA runs asynchronously)
    before each clock read."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def paired(baseline, candidate, repeats: int, sync=lambda: None) -> tuple[float, float, float]:
    """Median times of both and the median of per-pair ``candidate / baseline`` ratios.

    The two run alternately, so load that drifts during the benchmark (these machines are
    shared) hits both sides of each pair instead of biasing one of them.
    """
    timed(baseline, sync), timed(candidate, sync)  # warm-up
    tb, tc = [], []
    for _ in range(repeats):
        tb.append(timed(baseline, sync))
        tc.append(timed(candidate, sync))
    return statistics.median(tb), statistics.median(tc), statistics.median(c / b for b, c in zip(tb, tc))


def _sync(cfg: BenchConfig):
    return torch.cuda.synchronize if torch.device(cfg.device).type == "cuda" else (lambda: None)


@torch.no_grad()
def forward_overhead(cfg: BenchConfig, fresh, adapters) -> dict:
    base = fresh()
    mm = MixtureModel.from_adapters(fresh(), adapters, router=None)
    ids = torch.randint(1, cfg.vocab, (cfg.batch, cfg.seq), device=cfg.device)
    g = torch.Generator().manual_seed(0)
    weights = torch.zeros(cfg.batch, cfg.experts)
    for row in range(cfg.batch):  # top-k experts per sequence, renormalised
        pick = torch.randperm(cfg.experts, generator=g)[: cfg.top_k]
        weights[row, pick] = 1.0 / cfg.top_k
    active = int((weights > 0).any(0).sum())
    t_base, t_mix, ratio = paired(
        lambda: base(input_ids=ids, logits_to_keep=1),
        lambda: mm(input_ids=ids, expert_weights=weights, logits_to_keep=1),
        cfg.repeats,
        _sync(cfg),
    )
    linears = [(m.in_features, m.out_features) for m in mm.layers.values()]
    dense = sum(i * o for i, o in linears)

    def extra(k):
        return sum(k * cfg.rank * (i + o) for i, o in linears) / dense

    result = {}
    if cfg.dtype != "float32":  # experts are float32 as saved (as PEFT keeps them); cast to the base dtype too
        mm.to(getattr(torch, cfg.dtype))
        _, t_cast, ratio_cast = paired(
            lambda: base(input_ids=ids, logits_to_keep=1),
            lambda: mm(input_ids=ids, expert_weights=weights, logits_to_keep=1),
            cfg.repeats,
            _sync(cfg),
        )
        result = {"mixture_experts_in_base_dtype_s": t_cast, "ratio_experts_in_base_dtype": ratio_cast}
    return result | {
        "base_s": t_base,
        "mixture_s": t_mix,
        "ratio": ratio,
        "target_ratio": 1.15,
        "theoretical_extra_flops_topk": extra(cfg.top_k),
        "experts_active_in_batch": active,
        # Rows gather their own top-k experts when k < experts active in the batch; else the union runs.
        "theoretical_extra_flops_as_computed": extra(cfg.top_k if cfg.top_k < active else active),
    }


@torch.no_grad()
def heterogeneous_generation(cfg: BenchConfig, fresh, adapters) -> dict:
    names = list(adapters)
    prompts = torch.randint(1, cfg.vocab, (cfg.prompts, 16), device=cfg.device)
    owner = [names[i % len(names)] for i in range(cfg.prompts)]
    gen = {"max_new_tokens": cfg.new_tokens, "min_new_tokens": cfg.new_tokens, "do_sample": False, "pad_token_id": 0}
    mm = MixtureModel.from_adapters(fresh(), adapters, router=None)
    weights = torch.stack(
        [torch.nn.functional.one_hot(torch.tensor(names.index(o)), len(names)) for o in owner]
    ).float()
    peft = PeftModel.from_pretrained(fresh(), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    peft.eval()

    def loramix_batched():
        mm.generate(input_ids=prompts, expert_weights=weights, **gen)

    def peft_sequential():
        for i, name in enumerate(owner):
            peft.set_adapter(name)
            peft.generate(input_ids=prompts[i : i + 1], **gen)

    def peft_mixed_batch():
        peft.generate(input_ids=prompts, adapter_names=owner, **gen)

    # What is timed must be right: the batched mixture generates exactly what PEFT does per adapter.
    same = torch.equal(
        mm.generate(input_ids=prompts, expert_weights=weights, **gen),
        peft.generate(input_ids=prompts, adapter_names=owner, **gen),
    )
    t_mixed, t_mix, ratio_mixed = paired(peft_mixed_batch, loramix_batched, cfg.repeats, _sync(cfg))
    t_seq, _, ratio_seq = paired(peft_sequential, loramix_batched, 1, _sync(cfg))  # slow: one pair
    tokens = cfg.prompts * cfg.new_tokens
    return {
        "tokens": tokens,
        "loramix_tok_s": tokens / t_mix,
        "peft_set_adapter_tok_s": tokens / t_seq,
        "peft_adapter_names_tok_s": tokens / t_mixed,
        "speedup_vs_set_adapter": 1 / ratio_seq,
        "speedup_vs_adapter_names": 1 / ratio_mixed,
        "targets": {"vs_set_adapter": 3.0, "vs_adapter_names": 1.5},
        "outputs_match_peft": same,
    }


def memory(cfg: BenchConfig, fresh, adapters) -> dict:
    mm = MixtureModel.from_adapters(fresh(), adapters, router=None)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in mm.named_parameters() if "lora_" in n)
    model_bytes = sum(p.numel() * p.element_size() for p in fresh().parameters())
    per_expert = expert_bytes / cfg.experts
    return {"bytes_per_expert": per_expert, "bytes_full_model": model_bytes, "ratio": per_expert / model_bytes}


def run(output: str | Path, quick: bool = False, with_ray: bool = False, *, size: str | None = None, **over) -> dict:
    """Run the sections, write ``bench.json`` + ``bench.png`` to ``output``; ``over``: BenchConfig fields."""
    cfg = BenchConfig.preset(size or ("quick" if quick else "default"), **over)
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {cfg.device}: this torch sees no CUDA GPU; run on a GPU machine or use --device cpu."
        )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fresh, adapters = build(cfg, Path(tmp))
        result = {
            "config": asdict(cfg),
            "torch_threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor(),
            "forward_overhead": forward_overhead(cfg, fresh, adapters),
            "heterogeneous_generation": heterogeneous_generation(cfg, fresh, adapters),
            "memory": memory(cfg, fresh, adapters),
        }
        if with_ray:
            from benchmarks import ray_bench  # lazy: each benchmark loads only its own stack

            result |= ray_bench.run(Path(tmp) / "ray", quick)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out)
    return result


def plot(result: dict, out: Path) -> None:
    import matplotlib  # lazy: each benchmark loads only its own stack

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: each benchmark loads only its own stack

    f, h = result["forward_overhead"], result["heterogeneous_generation"]
    labels = ["forward\nmixture/base", "generation\nvs set_adapter", "generation\nvs adapter_names"]
    values = [f["ratio"], h["speedup_vs_set_adapter"], h["speedup_vs_adapter_names"]]
    targets = [f["target_ratio"], h["targets"]["vs_set_adapter"], h["targets"]["vs_adapter_names"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, values, color=["#4c72b0", "#55a868", "#55a868"])
    ax.scatter(labels, targets, marker="_", s=900, color="red", label="target")
    ax.set_ylabel("ratio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=100)
    plt.close(fig)


def summary(result: dict) -> str:
    f, h, m = result["forward_overhead"], result["heterogeneous_generation"], result["memory"]
    return "\n".join(
        [
            f"forward: mixture/base = {f['ratio']:.2f}x (target <= 1.15x); theoretical extra FLOPs "
            f"{f['theoretical_extra_flops_topk']:.1%} at top-{result['config']['top_k']}, "
            f"{f['theoretical_extra_flops_as_computed']:.1%} as computed "
            f"({f['experts_active_in_batch']} experts active)"
            + (
                f"; experts cast to the base dtype: {f['ratio_experts_in_base_dtype']:.2f}x"
                if "ratio_experts_in_base_dtype" in f
                else ""
            ),
            f"generation: {h['loramix_tok_s']:.0f} tok/s loramix vs {h['peft_set_adapter_tok_s']:.0f} "
            f"PEFT set_adapter "
            f"({h['speedup_vs_set_adapter']:.2f}x, target 3x) vs {h['peft_adapter_names_tok_s']:.0f} "
            f"PEFT adapter_names "
            f"({h['speedup_vs_adapter_names']:.2f}x, target 1.5x)",
            f"memory: {m['bytes_per_expert'] / 2**20:.2f} MiB per expert vs {m['bytes_full_model'] / 2**20:.1f} MiB "
            f"per model copy ({m['ratio']:.2%})",
        ]
        + _ray_lines(result)
    )


def _ray_lines(result: dict) -> list[str]:
    lines = []
    if "training" in result:
        t = result["training"]
        lines.append(
            f"training: {t['experts']} experts concurrently {t['concurrent_s']:.1f}s vs one after another "
            f"{t['sequential_s']:.1f}s ({t['speedup_concurrent']:.2f}x)"
        )
        for stage, z in t["zero"].items():
            vs = "" if stage == "0" else f" ({z['step_time_vs_zero0']:.2f}x time, {z['memory_vs_zero0']:.2f}x memory)"
            lines.append(
                f"  ZeRO-{stage}: {1e3 * z['seconds_per_step']:.0f} ms/step, peak {z['peak_rss_mib']:.0f} MiB{vs}"
            )
    if "serving" in result:
        srv = result["serving"]
        for topology in ("fused", "routed"):
            levels = ", ".join(
                f"c={c}: {v['requests_per_s']:.1f} req/s p50 {v['p50_ms']:.0f} ms p99 {v['p99_ms']:.0f} ms"
                for c, v in srv[topology].items()
            )
            lines.append(f"serving {topology}: {levels}")
    return lines
