"""The ``loramix`` command line.

loramix run CONFIG [--output DIR] [--address ADDR] [key.path=value ...]   the pipeline on Ray
loramix tune CONFIG [--output DIR] [--address ADDR] [key.path=value ...]  search rank/top-k/... with Tune
loramix add-domain OUTPUT --name NAME --train PATH [--eval PATH] [--address ADDR]
loramix add-expert OUTPUT --name NAME --adapter DIR --train PATH [--eval PATH]   a LoRA trained elsewhere
loramix replace-expert OUTPUT --name NAME (--train PATH | --adapter DIR)  /  remove-expert OUTPUT --name NAME
loramix demo CONFIG [--output DIR] [key.path=value ...]   the same stages in-process, no Ray
loramix demo-data DIR [--tasks reverse sort ...]            write the demo JSONL files
loramix serve ARTIFACT [--topology fused|routed] [--host H] [--port P] [--address A] [--api-key K]
loramix serve-update OUTPUT --version N [--address A]     move the running app to version N (no downtime)
loramix serve-config ARTIFACT [--version N] [--output FILE] [key.path=value ...]   Serve YAML for `serve deploy`
loramix config-help                                        every config key, default and meaning
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from loramix.config import ConfigError, config_help, load_config
from loramix.lock import LockedError

logger = logging.getLogger("loramix")


def _demo(args) -> int:
    from loramix.demo import run_demo  # lazy: `loramix --help` and config errors answer without loading torch/Ray
    from loramix.report import (
        format_report,  # lazy: `loramix --help` and config errors answer without loading torch/Ray
    )
    from pipelines.progress import (
        bar_report,  # lazy: `loramix --help` and config errors answer without loading torch/Ray
    )

    cfg = load_config(args.config, args.overrides)
    out = args.output or cfg.output
    report = run_demo(cfg, out, progress=bar_report)
    print(format_report(report))
    print(f"\nreport:   {out}/report.json\nartifact: {out}/artifact  (MixtureModel.from_pretrained)")
    _print_warnings(report)
    return 0


def _print_warnings(report: dict) -> None:
    """The report's warnings, last, on stderr, where a user looks after a long run."""
    for warning in report.get("warnings", []):
        print(f"loramix: warning: {warning}", file=sys.stderr)


def _run(args) -> int:
    from loramix.report import (
        format_report,  # lazy: `loramix --help` and config errors answer without loading torch/Ray
    )
    from pipelines.run import run_pipeline  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    cfg = load_config(args.config, args.overrides)
    out = args.output or cfg.output
    report = run_pipeline(cfg, out, args.address)
    print(format_report(report))
    cached = report.get("cached_stages") or []
    if cached:
        print(f"\nreused {len(cached)} finished stages: {', '.join(cached)}")
    print(f"\nreport:   {out}/report.json (+ report.md, accuracy.png, confusion.png, gates.png, loss_curves.png)")
    print(f"artifact: {out}/artifact  (MixtureModel.from_pretrained, loramix serve)")
    _print_warnings(report)
    return 0


def _tune(args) -> int:
    import tune_spaces  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    if args.list_spaces:
        print("\n".join(tune_spaces.describe()))
        return 0
    if not args.config:
        raise ConfigError("`loramix tune` needs a CONFIG (or --list-spaces).")
    from pipelines.tune import run_tune  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    cfg = load_config(args.config, args.overrides)
    out = args.output or cfg.output
    result = run_tune(cfg, out, args.address)
    best = result["best"]
    print(
        f"\n{len(result['trials'])} trials, {len(result['experts_trained'])} LoRAs trained, {result['seconds']:.0f} s"
    )
    print(f"best: {best['params']} -> {result['metric']} {best[result['metric']]:.3f}")
    print(f"results: {out}/tune/results.json  plot: {out}/tune/metric.png")
    print(f"run it:  loramix run {out}/tune/best.yaml")
    return 0


def _change_experts(args) -> int:
    from pipelines import experts  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    if args.command == "add-domain":
        report = experts.add_domain(args.output, args.name, args.train, args.eval, args.address)
    elif args.command == "add-expert":
        report = experts.add_expert(args.output, args.name, args.adapter, args.train, args.eval, args.address)
    elif args.command == "replace-expert":
        report = experts.replace_expert(
            args.output, args.name, train=args.train, adapter=args.adapter, eval_path=args.eval, address=args.address
        )
    else:
        report = experts.remove_expert(args.output, args.name, args.address)
    info = report["change"]
    print(f"{info['kind']} {info['name']}: version v{info['version']}, retrained {', '.join(info['retrained_stages'])}")
    if info["expert_steps"]:
        print(
            f"  {info['expert_steps']} expert steps vs {info['multitask_steps_all_domains']} to retrain one LoRA on "
            f"every domain (ratio {info['compute_ratio']:.2f})"
        )
    for d, v in info["kept_domains"].items():
        print(f"  {d}: {v['before']:.3f} -> {v['after']:.3f} ({v['delta']:+.3f})")
    return 0


def _bench(args) -> int:
    if args.serving:
        return _bench_serving(args)
    from benchmarks.bench import (  # lazy: `loramix --help` and config errors answer without loading torch/Ray
        run,
        summary,
    )

    over = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    result = run(args.output, with_ray=args.ray, size="quick" if args.quick else args.size, **over)
    print(summary(result))
    print(f"\nwrote {args.output}/bench.json and bench.png")
    return 0


def _bench_serving(args) -> int:
    from benchmarks import serving_bench  # lazy: `loramix --help` answers without loading torch/Ray

    result = serving_bench.http_mix() if args.http else serving_bench.run(requests=args.requests, rate=args.rate)
    print(serving_bench.http_summary(result) if args.http else serving_bench.summary(result))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = "serving_http.json" if args.http else "serving.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out / name}")
    return 0


def _demo_data(args) -> int:
    from loramix.synthetic import (
        write_demo_data,  # lazy: `loramix --help` and config errors answer without loading torch/Ray
    )

    info = write_demo_data(args.dir, args.tasks, args.train_size, args.eval_size)
    for d in info["domains"]:
        print(f"{d['name']}: {d['train']} {d['eval']}")
    return 0


def _serve(args) -> int:
    from loramix.versions import resolve  # lazy: `loramix --help` and config errors answer without loading torch/Ray
    from pipelines import serve  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    serve.check_detach(args.address, args.detach)  # flags first: before any file is read
    artifact = str(resolve(args.artifact, args.version))  # that version's serve settings
    key = serve.api_key_flag(args.api_key)
    flags = dict(topology=args.topology, host=args.host, port=args.port, api_key=key)
    cfg = serve.settings(artifact, args.overrides, **flags)
    serve.serve_forever(args.artifact, cfg, args.address, version=args.version, detach=args.detach)
    return 0


def _serve_config(args) -> int:
    from loramix.versions import resolve  # lazy: `loramix --help` and config errors answer without loading torch/Ray
    from pipelines import serve  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    artifact = str(resolve(args.artifact, args.version))  # that version's serve settings
    cfg = serve.settings(artifact, args.overrides, topology=args.topology)
    text = serve.write_serve_config(args.artifact, cfg, args.output, version=args.version)
    print(f"wrote {args.output}" if args.output else text, end="\n" if args.output else "")
    return 0


def _serve_update(args) -> int:
    from pipelines import serve  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    moved = serve.update(args.run, args.version, args.address)
    print(f"serving v{moved['to']} (was v{moved['from']}); the switch took {moved['seconds']:.1f} s", flush=True)
    return 0


def _versions(args) -> int:
    from loramix.versions import listing  # lazy: `loramix --help` and config errors answer without loading torch/Ray

    rows = listing(args.output)
    if not rows:
        raise ConfigError(f"{args.output!r} has no artifact versions; `loramix run` publishes them.")
    print("version  created              experts                          avg EM  router  changes")
    for r in rows:
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        acc = "-" if r["router_accuracy"] is None else f"{r['router_accuracy']:.3f}"
        c = r["changes"]
        marks = [f"+{n}" for n in c.get("experts_added", [])] + [f"-{n}" for n in c.get("experts_removed", [])]
        marks += [f"~{n}" for n in c.get("experts_replaced", [])] + (["router"] if c.get("router_retrained") else [])
        what = ", ".join(marks)
        mark = "*" if r["current"] else " "
        experts = ",".join(r["experts"])
        print(f"{mark}v{r['version']:<6} {r['created'] or '-':<20} {experts[:32]:<32} {em:>6}  {acc:>6}  {what}")
    return 0


def _config_help(args) -> int:
    print("\n".join(config_help()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramix", description="Mixtures of LoRA experts on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the pipeline on Ray (local instance, RAY_ADDRESS or --address)")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("--output", help="output directory (default: the config's `output`); shared storage on a cluster")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else start a local instance)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. router.top_k=2")
    p.set_defaults(func=_run)
    p = sub.add_parser("tune", help="search LoRA rank, router top-k, learning rates, recipe with Ray Tune")
    p.add_argument("config", nargs="?", help="YAML config; its `tune` section picks the space")
    p.add_argument("--output", help="output directory (results under OUTPUT/tune); rerun to resume")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else start a local instance)")
    p.add_argument("--list-spaces", action="store_true", help="list the search spaces in tune_spaces/")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. tune.num_samples=8")
    p.set_defaults(func=_tune)
    changes = {
        "add-domain": "train one new expert into a finished run and refresh its router",
        "add-expert": "bring a PEFT LoRA trained elsewhere on the same base into a finished run",
        "replace-expert": "retrain an expert on new rows (--train) or swap in another LoRA (--adapter)",
        "remove-expert": "drop an expert and retrain the router over the others",
    }
    for command, help_text in changes.items():
        p = sub.add_parser(command, help=help_text + "; publishes a new artifact version")
        p.add_argument("output", help="the finished run's output directory")
        p.add_argument("--name", required=True, help="the expert (domain) name")
        if command in ("add-expert", "replace-expert"):
            p.add_argument("--adapter", required=command == "add-expert", help="PEFT LoRA folder (safetensors)")
        if command != "remove-expert":
            needed = command in ("add-domain", "add-expert")
            p.add_argument("--train", required=needed, help="rows of the domain: train the expert / teach the router")
            p.add_argument("--eval", required=needed, help="held-out rows of the domain, for the report")
        p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else start a local instance)")
        p.set_defaults(func=_change_experts)
    p = sub.add_parser("demo", help="run the offline demo end to end in this process (no Ray)")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("--output", help="output directory (default: the config's `output`)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. router.top_k=2")
    p.set_defaults(func=_demo)
    p = sub.add_parser("demo-data", help="write the demo domains as JSONL")
    p.add_argument("dir")
    p.add_argument("--tasks", nargs="+", default=["reverse", "rotate", "shift", "swap"])
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--eval-size", type=int, default=200)
    p.set_defaults(func=_demo_data)
    p = sub.add_parser("bench", help="benchmark the mixture against its base and PEFT (ratios, same process)")
    p.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes), as CI runs it")
    p.add_argument(
        "--size",
        choices=["quick", "default", "large"],
        default="default",
        help="default: hidden 512 (the targets' sizes); large: Llama-7B-shaped blocks, for a GPU",
    )
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="the base's dtype (default float32)")
    p.add_argument("--ray", action="store_true", help="also training (ZeRO, concurrency) and serving on local Ray")
    p.add_argument(
        "--serving",
        action="store_true",
        help="only the serving engine: continuous vs static batching on one open-loop arrival trace",
    )
    p.add_argument("--requests", type=int, default=400, help="--serving: requests in the trace")
    p.add_argument("--rate", type=float, default=200.0, help="--serving: arrivals per second (above capacity)")
    p.add_argument("--http", action="store_true", help="--serving: the mix over real HTTP, 1 vs 32 clients")
    p.add_argument("--output", default="out/bench")
    p.set_defaults(func=_bench)
    p = sub.add_parser("versions", help="list a run's artifact versions (* marks the one OUTPUT/artifact names)")
    p.add_argument("output", help="the run's output directory")
    p.set_defaults(func=_versions)
    p = sub.add_parser("serve", help="serve an artifact on Ray Serve (OpenAI-compatible HTTP)")
    p.add_argument("artifact", help="a run folder (its current version), OUTPUT/artifact or OUTPUT/artifacts/vN")
    p.add_argument("--version", type=int, help="serve this version of the run (default: the current one)")
    p.add_argument("--topology", choices=["fused", "routed"], help="default: the artifact's serve.json, else fused")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else start a local instance)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: LORAMIX_API_KEY)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once deployed; the app keeps running on the cluster (needs --address or RAY_ADDRESS)",
    )
    p.add_argument("overrides", nargs="*", help="serve settings, e.g. experts.num_gpus=1 route_threshold=0.9")
    p.set_defaults(func=_serve)
    p = sub.add_parser("serve-update", help="move the running app to another version of its run (rolling, no downtime)")
    p.add_argument("run", help="the run folder the app serves (OUTPUT)")
    p.add_argument("--version", type=int, required=True, help="the version to serve (`loramix versions OUTPUT`)")
    p.add_argument("--address", help="the cluster the app runs on (default: RAY_ADDRESS)")
    p.set_defaults(func=_serve_update)
    p = sub.add_parser("serve-config", help="write a Serve config YAML (`serve deploy`) for an artifact")
    p.add_argument("artifact", help="a run folder, OUTPUT/artifact or OUTPUT/artifacts/vN")
    p.add_argument("--version", type=int, help="that version of the run (default: the current one)")
    p.add_argument("--topology", choices=["fused", "routed"])
    p.add_argument("--output", help="file to write (default: print)")
    p.add_argument("overrides", nargs="*", help="serve settings, e.g. experts.autoscaling.min_replicas=0")
    p.set_defaults(func=_serve_config)
    p = sub.add_parser("config-help", help="print every config key with its default and description")
    p.set_defaults(func=_config_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options: `CONFIG --output D a.b=1`
    if extra and (not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, LockedError) as err:
        print(f"loramix: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
