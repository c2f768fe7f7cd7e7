"""The `lora-dpo` command: precompute-ref, train, eval, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from lora_dpo.errors import LoraDpoError
from lora_dpo.versions import package_versions

log = logging.getLogger("lora_dpo")

OVERRIDES_HELP = "key=value overrides, e.g. train.beta=0.05 data.max_length=2048"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-dpo",
        description="Memory-efficient LoRA/QLoRA DPO with a cached reference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print package versions and exit")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    precompute = verbs.add_parser(
        "precompute-ref",
        help="run the frozen reference once and write the reference cache",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_args(precompute)

    train = verbs.add_parser(
        "train",
        help="train a LoRA policy against the reference cache",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_args(train)

    evaluate = verbs.add_parser(
        "eval",
        help="held-out reward and preference accuracy of an adapter (or the base)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("--adapter", help="PEFT adapter directory (default: the bare base)")
    _add_config_args(evaluate)

    demo = verbs.add_parser(
        "demo",
        help="the whole pipeline on an embedded tiny model (CPU, no downloads)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--workdir", default="runs/demo", help="where the demo writes everything")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        for name, version in package_versions().items():
            print(f"{name} {version}")
        return 0
    if args.verb is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _run(args)
    except LoraDpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from lora_dpo.config import load_config

    if args.verb == "demo":
        from lora_dpo.demo import run_demo

        run_demo(args.workdir)
        return 0
    config = load_config(args.config, args.overrides)
    if args.verb == "precompute-ref":
        from precompute import precompute_reference

        precompute_reference(config)
    elif args.verb == "train":
        from lora_dpo.train import train

        train(config)
    elif args.verb == "eval":
        from lora_dpo.evaluate import evaluate_run

        metrics = evaluate_run(config, args.adapter)
        for key, value in metrics.to_dict().items():
            print(f"{key}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
