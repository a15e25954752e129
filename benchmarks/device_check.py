"""What a GPU run checks that the CPU test suite cannot: ``python -m benchmarks.device_check --out DIR``.

CI and the test suite run on CPUs only. On a machine with a CUDA GPU this script runs, without Ray:

1. ``pipeline``: every in-process stage body (base, experts, multitask, router, all evaluations)
   for moa, mole and modula + universal, on the GPU (``loramix demo``'s code path; the same
   bodies run inside ``loramix run``'s Ray tasks when ``resources.use_gpu`` gives them a GPU);
2. ``serving``: the serving Engine on that GPU equals ``MixtureModel.generate`` token for token;
3. ``deepspeed``: the Ray Train worker's DeepSpeed engine on the GPU with NCCL, ZeRO 0/2/3 over
   a bf16 base: the loss falls, and the ZeRO-3 adapter equals the ZeRO-0 one;
4. ``bench``: ``loramix bench`` sections at the issue's sizes (fp32, bf16) and Llama-7B-shaped
   blocks (bf16), each a ratio against a baseline timed alternately in the same process;
5. ``profile``: kernel counts and GPU time of the base and the mixture forward;
6. ``graphs``: CUDA graphs (:mod:`loramix.decode_graphs`): greedy decoding through graphs equals
   ``generate`` and eager decoding for moa, mole and modula with staggered arrivals; decode
   tokens/s graph vs eager; the mixture forward / base forward, both captured as graphs.

Each part is independent (one failing is recorded and the next runs); results go to
``DIR/device_check.json`` after every part, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import TINY_SYNTHETIC

PARTS = ("pipeline", "serving", "deepspeed", "bench", "profile", "graphs")
CUDA = torch.cuda.is_available()  # --dry-run on a CPU exercises the script itself, not the GPU


def _reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if CUDA else 0.0


def tiny_config(root: Path, recipe: str, **over):
    from loramix.config import build_config  # lazy: each benchmark loads only its own stack
    from loramix.synthetic import write_demo_data  # lazy: each benchmark loads only its own stack

    info = write_demo_data(root / "data", ["reverse", "rotate", "swap"], train_size=128, eval_size=16)
    data = {
        "recipe": recipe,
        "output": str(root / recipe),
        "model": {"synthetic": TINY_SYNTHETIC | {"pretrain_steps": 30, "batch_size": 32}},
        "data": {"max_length": 32, "eval_limit": 16, "domains": info["domains"]},
        "expert": {"rank": 4, "steps": 20, "batch_size": 16},
        "router": {"steps": 20, "batch_size": 16, "top_k": 1 if recipe == "moa" else 2},
    }
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


def pipeline(root: Path) -> dict:
    from loramix.demo import run_demo  # lazy: each benchmark loads only its own stack

    out = {}
    modula = {"universal.enabled": "true", "universal.steps": 20, "router.context": "prompt", "router.label_coef": 5}
    runs = (
        ("moa", {}),
        ("mole", {"router.label_coef": 5}),
        ("modula", modula),
        ("modula_res", modula | {"universal.variant": "res"}),
    )
    for name, over in runs:
        recipe = name.split("_")[0]
        _reset_peak()
        t0 = time.perf_counter()
        report = run_demo(tiny_config(root, recipe, **over), root / name)
        out[name] = {
            "seconds": time.perf_counter() - t0,
            "peak_gpu_mib": _peak_mib(),
            "exact_match": {m: r["avg"]["exact_match"] for m, r in report["methods"].items() if "avg" in r},
            "router_accuracy": report["router"]["accuracy"],
        }
        assert out[name]["peak_gpu_mib"] > 0 or not CUDA, "the stages ran without touching the GPU"
    return out


def serving(root: Path) -> dict:
    from loramix.model import MixtureModel  # lazy: each benchmark loads only its own stack
    from loramix.serving import (  # lazy: each benchmark loads only its own stack
        Engine,
        GenerationRequest,
        SamplingParams,
    )

    artifact = root / "moa" / "artifact"
    if not artifact.is_dir():
        from loramix.synthetic import demo_artifact  # lazy: each benchmark loads only its own stack

        artifact = demo_artifact(root / "serving-artifact")
    engine = Engine.from_artifact(artifact)
    device = engine.device
    assert device.type == ("cuda" if CUDA else "cpu"), device
    prompts = ["reverse hello=", "rotate world=", "swap abcde=", "reverse xy="]
    ids = [engine.encode(p) for p in prompts]
    mm = MixtureModel.from_pretrained(artifact).to(device).eval()
    same, eos = [], engine.tokenizer.eos_token_id
    for i in ids:  # one request at a time: the reference decodes the same unpadded prompt
        (c,) = engine.complete([GenerationRequest(i, SamplingParams(max_tokens=8))])
        ref = mm.generate(input_ids=torch.tensor([i], device=device), max_new_tokens=8, do_sample=False)
        want = ref[0, len(i) :].tolist()
        want = want[: want.index(eos)] if eos in want else want  # the Engine ends at EOS without it
        same.append(c.token_ids == want)
    batched = engine.complete([GenerationRequest(i, SamplingParams(max_tokens=8)) for i in ids])
    sampled = engine.complete(
        [GenerationRequest(i, SamplingParams(max_tokens=8, temperature=0.8, seed=7)) for i in ids] * 2
    )
    repeatable = [a.token_ids == b.token_ids for a, b in zip(sampled[: len(ids)], sampled[len(ids) :])]
    assert all(same) and all(repeatable), (same, repeatable)
    return {
        "greedy_equals_generate": same,
        "seeded_sampling_repeats": repeatable,
        "batched_texts": [c.text for c in batched],
    }


def deepspeed_zero(root: Path, steps: int = 30) -> dict:
    """The worker's engine (actors.lora_worker.make_engine) on one GPU over NCCL, ZeRO 0/2/3."""
    import torch.distributed as dist  # lazy: each benchmark loads only its own stack
    from safetensors.torch import load_file  # lazy: each benchmark loads only its own stack

    from actors.lora_worker import (  # lazy: each benchmark loads only its own stack
        DeepSpeedStepper,
        deepspeed_template,
        make_engine,
        write_adapter,
    )
    from loramix import data, loops, synthetic  # lazy: each benchmark loads only its own stack
    from loramix.config import ExpertConfig  # lazy: each benchmark loads only its own stack
    from loramix.trainees import build_trainee  # lazy: each benchmark loads only its own stack

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if CUDA:
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    tokenizer = synthetic.build_tokenizer()
    torch.manual_seed(0)
    base = synthetic.build_base(tokenizer, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4)
    base = base.to(torch.bfloat16)
    rows = data.tokenize_rows(synthetic.make_rows("reverse", 512, seed=0), tokenizer, 32)
    cfg = ExpertConfig(rank=8, alpha=16, steps=steps, batch_size=16, lr=2e-3)
    out = {"backend": dist.get_backend()}
    for stage in (0, 2, 3):
        torch.manual_seed(0)
        model = build_trainee(copy.deepcopy(base), cfg, adapter_name="expert")
        engine = make_engine(model, cfg, deepspeed_template(stage), 1)
        _reset_peak()
        it = data.batches(rows, cfg.batch_size, tokenizer.pad_token_id, seed=0, steps=steps)
        summary = loops.run_steps(engine, it, loops.lm_loss, DeepSpeedStepper(engine), report=lambda m, c=None: None)
        adapter = write_adapter(engine, model, root / f"zero{stage}", 0)
        out[f"zero{stage}"] = {
            "device": str(engine.device),
            "first_loss": summary["losses"][0],
            "final_loss": summary["final_loss"],
            "ms_per_step": 1e3 * summary["seconds"] / steps,
            "peak_gpu_mib": _peak_mib(),
            "adapter": str(adapter / "adapter_model.safetensors"),
        }
        del engine, model
    ref = load_file(out["zero0"]["adapter"])
    for stage in (2, 3):
        got = load_file(out[f"zero{stage}"]["adapter"])
        assert got.keys() == ref.keys() and ref, "adapters differ in keys or are empty"
        out[f"zero{stage}"]["max_rel_diff_vs_zero0"] = max(
            float((got[k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp_min(1e-12)) for k in ref
        )
    return out


BENCHES = {
    "default_fp32": ("default", "float32"),
    "default_bf16": ("default", "bfloat16"),
    "large_bf16": ("large", "bfloat16"),
}


def bench(root: Path, names=tuple(BENCHES)) -> dict:
    from benchmarks.bench import run, summary  # lazy: each benchmark loads only its own stack

    out = {}
    for name in names:
        size, dtype = BENCHES[name]
        size = size if CUDA else "quick"
        result = run(root / name, size=size, device="cuda" if CUDA else "cpu", dtype=dtype)
        out[name] = result
        print(f"--- bench {name}\n{summary(result)}", flush=True)
    return out


def profile(root: Path) -> dict:
    """Where the mixture's extra forward time goes: kernel counts and the top kernels, base vs mixture."""
    from torch.profiler import ProfilerActivity  # lazy: each benchmark loads only its own stack
    from torch.profiler import profile as torch_profile  # lazy: each benchmark loads only its own stack

    from benchmarks.bench import BenchConfig, build  # lazy: each benchmark loads only its own stack
    from loramix import MixtureModel  # lazy: each benchmark loads only its own stack

    out = {}
    for size in ("default", "large"):
        cfg = BenchConfig.preset(size if CUDA else "quick", device="cuda" if CUDA else "cpu", dtype="bfloat16")
        fresh, adapters = build(cfg, root / f"profile-{size}")
        mm = MixtureModel.from_adapters(fresh(), adapters, router=None).to(torch.bfloat16)
        ids = torch.randint(1, cfg.vocab, (cfg.batch, cfg.seq), device=cfg.device)
        weights = torch.zeros(cfg.batch, cfg.experts)
        for row in range(cfg.batch):
            weights[row, [row % cfg.experts, (row + 3) % cfg.experts]] = 0.5
        activity = ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU
        key = "self_device_time_total" if CUDA else "self_cpu_time_total"
        for name, model, kw in (("base", fresh(), {}), ("mixture", mm, {"expert_weights": weights})):
            with torch.no_grad():
                for _ in range(2):
                    model(input_ids=ids, logits_to_keep=1, **kw)
                with torch_profile(activities=[activity]) as prof:
                    model(input_ids=ids, logits_to_keep=1, **kw)
                    if CUDA:
                        torch.cuda.synchronize()
            events = prof.key_averages()
            out[f"{size}/{name}"] = {
                "kernels": sum(e.count for e in events if getattr(e, key) > 0),
                "device_ms": sum(getattr(e, key) for e in events) / 1e3,
            }
            print(f"--- profile {size}/{name}: {out[f'{size}/{name}']}", flush=True)
            print(events.table(sort_by=key, row_limit=12), flush=True)
    return out


def _graphed(fn):
    """``fn`` captured as a CUDA graph (warmed up on a side stream first); returns its replay.
    On a CPU (--dry-run): ``fn`` itself."""
    if not CUDA:
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.no_grad()
def _forward_graphs(root: Path, size: str, dtype: str) -> dict:
    """Mixture forward / base forward at ``size``, each captured as a CUDA graph (and eager, for reference)."""
    from benchmarks.bench import BenchConfig, build, paired  # lazy: each benchmark loads only its own stack
    from loramix import MixtureModel  # lazy: each benchmark loads only its own stack

    cfg = BenchConfig.preset(size if CUDA else "quick", device="cuda" if CUDA else "cpu", dtype=dtype)
    fresh, adapters = build(cfg, root / f"fwd-{size}-{dtype}")
    base = fresh()
    mm = MixtureModel.from_adapters(fresh(), adapters, router=None).cast_experts(getattr(torch, dtype))
    ids = torch.randint(1, cfg.vocab, (cfg.batch, cfg.seq), device=cfg.device)
    weights = torch.zeros(cfg.batch, cfg.experts)
    for row in range(cfg.batch):
        weights[row, [row % cfg.experts, (row + 3) % cfg.experts]] = 0.5
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def run_base():
        return base(input_ids=ids, logits_to_keep=1, use_cache=False)

    def run_mixture():  # inside decoding(): the gates are fixed, as a serving step's are
        return mm.base_model(input_ids=ids, logits_to_keep=1, use_cache=False)

    with mm.decoding(ids, torch.ones_like(ids), weights):
        t_base, t_mix, ratio = paired(_graphed(run_base), _graphed(run_mixture), cfg.repeats, sync)
        e_base, e_mix, e_ratio = paired(run_base, run_mixture, cfg.repeats, sync)
        variants = _layer_variants(run_base, run_mixture, cfg.repeats, sync)
    return {
        "graph_base_ms": 1e3 * t_base,
        "graph_mixture_ms": 1e3 * t_mix,
        "graph_ratio": ratio,
        "eager_base_ms": 1e3 * e_base,
        "eager_mixture_ms": 1e3 * e_mix,
        "eager_ratio": e_ratio,
        "target_ratio": 1.15,
        "variants": variants,
    }


def _layer_variants(run_base, run_mixture, repeats: int, sync) -> dict:
    """The GPU path's two launch savings (:data:`loramix.layers.GPU_SHARED_SHRINK`, ``GPU_LORA_FIRST``)
    on and off, each captured as a graph and timed round-robin with the base: median mixture / base
    per round, and the largest logit difference from both off."""
    from benchmarks.bench import timed  # lazy: each benchmark loads only its own stack
    from loramix import layers  # lazy: each benchmark loads only its own stack

    shipped = layers.GPU_SHARED_SHRINK, layers.GPU_LORA_FIRST
    flags = {
        "neither": (False, False),
        "shared_shrink": (True, False),
        "lora_first": (False, True),
        "both": (True, True),
    }
    replays, logits = {}, {}
    try:
        for name, (share, first) in flags.items():
            layers.GPU_SHARED_SHRINK, layers.GPU_LORA_FIRST = share, first
            logits[name] = run_mixture().logits.float()
            replays[name] = _graphed(run_mixture)
    finally:
        layers.GPU_SHARED_SHRINK, layers.GPU_LORA_FIRST = shipped
    base = _graphed(run_base)
    for fn in (base, *replays.values()):
        timed(fn, sync)
    ratios: dict[str, list[float]] = {name: [] for name in replays}
    for _ in range(repeats):
        t_base = timed(base, sync)
        for name, fn in replays.items():
            ratios[name].append(timed(fn, sync) / t_base)
    ref = logits["neither"]
    return {
        name: {
            "ratio": statistics.median(r),
            "max_logit_diff": float((logits[name] - ref).abs().max()),
            "ref_logit_scale": float(ref.abs().max()),
        }
        for name, r in ratios.items()
    }


def graphs(root: Path) -> dict:
    """CUDA graphs: the decoding engine (equality, tokens/s) and the forward (mixture / base)."""
    import sys  # lazy: each benchmark loads only its own stack

    from loramix import decode_graphs  # lazy: each benchmark loads only its own stack
    from loramix.batching import Scheduler  # lazy: each benchmark loads only its own stack
    from loramix.serving import Engine, GenerationRequest, SamplingParams  # lazy: only its own stack
    from loramix.synthetic import demo_artifact  # lazy: each benchmark loads only its own stack

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_decode_graphs import RECIPES, run_staggered  # the test suite's trace, on the GPU
    from test_serving import reference  # MixtureModel.generate on one prompt, cut at EOS

    decode_graphs.EMULATE_ON_CPU = not CUDA  # --dry-run: the same path, emulated
    out: dict = {"equal": {}}
    for key, (recipe, kwargs) in RECIPES.items():
        path = demo_artifact(root / f"graphs-{key}" / "artifact", recipe=recipe, top_k=2, router_kwargs=kwargs)
        engine = Engine.from_artifact(path)
        runs = {}
        for name, on in (("graph", True), ("eager", False)):
            scheduler = Scheduler(engine, max_running=6, cuda_graphs=on)
            reqs, texts, runs[name] = run_staggered(scheduler, engine)
            if on:
                held = [b.graphs for b in scheduler.batches.values()]
                assert held and all(g is not None and not g.broken and g.graphs for g in held), "no graph replayed"
        ref = [reference(engine, t, r.params.max_tokens, r.expert_weights) for r, t in zip(reqs[:7], texts)]
        out["equal"][key] = {
            "graph_equals_generate": runs["graph"][:7] == ref,
            "graph_equals_eager_incl_sampled": runs["graph"] == runs["eager"],
        }
        print(f"--- graphs {key}: {out['equal'][key]}", flush=True)
    assert all(v for r in out["equal"].values() for v in r.values()), out["equal"]

    # Decode tokens/s: 32 rows decoding up to 96 tokens each, graphs vs eager alternately (median of
    # 3); one scheduler per mode, so graphs are captured once (the warm-up) and replayed after.
    sizes = {"demo": (128, 4), "wide": (1024, 8)} if CUDA else {"demo": (64, 2)}
    for size, (hidden, layers) in sizes.items():
        path = demo_artifact(root / f"decode-{size}" / "artifact", top_k=2, hidden_size=hidden, num_layers=layers)
        engine = Engine.from_artifact(path)
        prompts = [engine.encode(f"{n} {'abcdefgh'[: 3 + i % 5]}=") for i, n in enumerate(engine.expert_names * 11)]
        reqs = [GenerationRequest(p, SamplingParams(max_tokens=96 if CUDA else 16)) for p in prompts[:32]]
        schedulers = {"graph": Scheduler(engine, cuda_graphs=True), "eager": Scheduler(engine, cuda_graphs=False)}

        def decode(name, reqs=reqs, schedulers=schedulers):
            t0 = time.perf_counter()
            done = schedulers[name].complete(reqs)
            assert all(c.finish_reason in ("stop", "length") for c in done), [c.error for c in done]
            return sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0), [c.token_ids for c in done]

        t0 = time.perf_counter()
        _, first = decode("graph")  # captures its graphs
        capture_s = time.perf_counter() - t0
        assert decode("eager")[1] == first, "graph and eager decoding differ"
        rates = {"graph": [], "eager": []}
        for _ in range(3):
            for name in rates:
                rates[name].append(decode(name)[0])
        graph, eager = statistics.median(rates["graph"]), statistics.median(rates["eager"])
        out[f"decode_{size}"] = {
            "hidden": hidden,
            "layers": layers,
            "graph_tokens_per_s": graph,
            "eager_tokens_per_s": eager,
            "speedup": graph / eager,
            "first_run_with_captures_s": capture_s,
            "graphs_captured": sum(len(b.graphs.graphs) for b in schedulers["graph"].batches.values()),
        }
        print(f"--- graphs decode {size}: {out[f'decode_{size}']}", flush=True)

    # The forward: base vs mixture (fixed top-2 weights per row), both as CUDA graphs.
    for size, dtype in (("default", "float32"), ("default", "bfloat16"), ("large", "bfloat16")):
        out[f"forward_{size}_{dtype}"] = _forward_graphs(root, size, dtype)
        print(f"--- graphs forward {size} {dtype}: {out[f'forward_{size}_{dtype}']}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--bench", nargs="*", default=list(BENCHES), choices=list(BENCHES), help="bench configs")
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU (small sizes) to test the script")
    args = parser.parse_args()
    if not CUDA and not args.dry_run:
        parser.error("this check needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs it on CPU.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import peft  # lazy: each benchmark loads only its own stack
    import transformers  # lazy: each benchmark loads only its own stack

    results = {
        "env": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "gpu": torch.cuda.get_device_name() if CUDA else None,
        }
    }
    funcs = {
        "pipeline": pipeline,
        "serving": serving,
        "deepspeed": deepspeed_zero,
        "bench": bench,
        "profile": profile,
        "graphs": graphs,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            t0 = time.perf_counter()
            try:
                kwargs = {"names": args.bench} if part == "bench" else {}
                results[part] = {"ok": True, **funcs[part](Path(tmp), **kwargs)}
            except Exception as err:  # record and go on: the next part may still tell us something
                results[part] = {"ok": False, "error": repr(err), "traceback": traceback.format_exc()}
                traceback.print_exc()
            results[part]["part_seconds"] = time.perf_counter() - t0
            print(
                f"=== {part}: {'ok' if results[part]['ok'] else 'FAILED'} in {results[part]['part_seconds']:.0f}s",
                flush=True,
            )
            (out / "device_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if all(results[p]["ok"] for p in args.parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
