"""The ``loramix`` command line.

    loramix demo CONFIG [--output DIR] [key.path=value ...]   core-only demo (no Ray)
    loramix demo-data DIR [--tasks reverse sort ...]            write the demo JSONL files
    loramix config-help                                        every config key, default and meaning
"""

from __future__ import annotations

import argparse
import logging
import sys

from loramix.config import ConfigError, config_help, load_config

logger = logging.getLogger("loramix")


def _demo(args) -> int:
    from loramix.demo import format_report, run_demo
    from pipelines.progress import bar_report

    cfg = load_config(args.config, args.overrides)
    out = args.output or cfg.output
    report = run_demo(cfg, out, progress=bar_report)
    print(format_report(report))
    print(f"\nreport:   {out}/report.json\nartifact: {out}/artifact  (MixtureModel.from_pretrained)")
    return 0


def _demo_data(args) -> int:
    from loramix.synthetic import write_demo_data

    info = write_demo_data(args.dir, args.tasks, args.train_size, args.eval_size)
    for d in info["domains"]:
        print(f"{d['name']}: {d['train']} {d['eval']}")
    return 0


def _config_help(args) -> int:
    print("\n".join(config_help()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramix", description="Mixtures of LoRA experts on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the offline demo end to end in this process (no Ray)")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("--output", help="output directory (default: the config's `output`)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. router.top_k=2")
    p.set_defaults(func=_demo)
    p = sub.add_parser("demo-data", help="write the demo domains as JSONL")
    p.add_argument("dir")
    p.add_argument("--tasks", nargs="+", default=["reverse", "sort", "rotate", "shift"])
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--eval-size", type=int, default=200)
    p.set_defaults(func=_demo_data)
    p = sub.add_parser("config-help", help="print every config key with its default and description")
    p.set_defaults(func=_config_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"loramix: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
