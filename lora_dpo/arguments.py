"""The `lora-dpo` command line: every verb, its options and their help (defaults shown).

Usage mistakes are one line too: `OneLineParser.error` raises instead of printing argparse's
usage block, and `lora_dpo.cli.main` prints `error: <message> (see lora-dpo VERB --help)`.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

OVERRIDES_HELP = "key=value overrides, e.g. train.beta=0.05 data.max_length=2048"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    _add_quiet_arg(parser)


def _add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bars, for non-interactive logs (training still prints one line per logging step)",
    )


def _add_no_wait_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once when another process is writing the cache, instead of waiting for it",
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before a mistake; here it is one line like every other
    error, pointing at the verb's --help. Sub-verbs' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to every option's help, unless the help already says its default
    in words; an unset (None) default reads `(default: none)`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or not action.option_strings:
            return text
        if action.default is None:
            return f"{text} (default: none)"
        return super()._get_help_string(action)


def _use_help_formatter(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """HelpFormatter for the command and every verb (and sub-verb) under it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_help_formatter(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lora-dpo",
        description="Memory-efficient LoRA/QLoRA DPO with a cached reference.",
    )
    parser.add_argument("--version", action="store_true", help="print package versions and exit")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    precompute = verbs.add_parser(
        "precompute-ref",
        help="make the reference cache cover the data: the frozen reference scores only the pairs it lacks",
    )
    precompute.add_argument(
        "--rebuild",
        action="store_true",
        help="replace the cache (also one of another reference) instead of adding to it; "
        "the old one stays usable until the new one is complete",
    )
    _add_no_wait_arg(precompute)
    _add_config_args(precompute)

    train = verbs.add_parser(
        "train",
        help="train a LoRA policy against the reference cache",
    )
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN from its latest checkpoint, with the config saved in RUN (overrides apply on top)",
    )
    _add_config_args(train)

    evaluate = verbs.add_parser(
        "eval",
        help="held-out reward and preference accuracy of an adapter (or the base)",
    )
    evaluate.add_argument(
        "--adapter",
        help="a train run directory (RUN or RUN/adapter) or any PEFT LoRA adapter directory (default: the bare base)",
    )
    evaluate.add_argument(
        "--base",
        help="base model path or hub name, instead of model.name_or_path; also accepts an adapter "
        "trained on another base (its shapes are still checked)",
    )
    _add_config_args(evaluate)

    generate = verbs.add_parser(
        "generate",
        help="complete held-out prompts with the policy and its reference (samples.jsonl, samples.md)",
    )
    generate.add_argument(
        "--adapter",
        required=True,
        help="a train run directory (RUN or RUN/adapter) or any PEFT adapter directory",
    )
    generate.add_argument(
        "--prompts",
        type=int,
        default=8,
        help="how many held-out prompts (the eval split's first distinct ones)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion at most")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--seed", type=int, help="sampling seed (default: 0)")
    generate.add_argument("--temperature", type=float, help="sampling temperature (default: 1.0)")
    generate.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling: keep the most likely tokens up to this mass (default: 1.0)",
    )
    generate.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    generate.add_argument("--out", help="where samples.jsonl and samples.md go (default: the run directory)")
    _add_config_args(generate)

    sweep = verbs.add_parser(
        "sweep",
        help="one training run per point of a grid of train.* settings on one reference cache, with a table and plot",
    )
    sweep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="train.KEY=V1,V2",
        help="an axis of the grid (repeatable, none by default; the grid is every combination), e.g. train.loss_type=sigmoid,ipo",
    )
    sweep.add_argument(
        "--betas", help="comma-separated betas, shorthand for --set train.beta=..., e.g. 0.01,0.05,0.1,0.5"
    )
    _add_config_args(sweep)

    cache = verbs.add_parser(
        "cache",
        help="inspect, verify, export, import and merge reference caches",
    )
    cache_verbs = cache.add_subparsers(dest="cache_verb", metavar="ACTION", required=True)
    cache_info = cache_verbs.add_parser(
        "info", help="the manifest in human form, with statistics of margins and response lengths"
    )
    cache_info.add_argument("cache_dir", metavar="DIR")
    cache_info.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="PATH",
        help="also draw the margins and lengths into PATH (default when given without PATH: DIR/cache.png)",
    )
    cache_verify = cache_verbs.add_parser(
        "verify", help="re-check every shard (checksum, fields, shapes, values); exit 1 on any problem"
    )
    cache_verify.add_argument("cache_dir", metavar="DIR")
    cache_export = cache_verbs.add_parser(
        "export", help="write the cache as one parquet table, identity in its metadata"
    )
    cache_export.add_argument("cache_dir", metavar="DIR")
    cache_export.add_argument("--out", required=True, metavar="FILE", help="the .parquet file to write")
    cache_import = cache_verbs.add_parser(
        "import", help="add the pairs of an exported table to a cache of the same reference (or a new one)"
    )
    cache_import.add_argument("file", metavar="FILE")
    cache_import.add_argument("--into", required=True, metavar="DIR", help="the cache to add to")
    _add_no_wait_arg(cache_import)
    cache_merge = cache_verbs.add_parser("merge", help="join caches of the same reference into one")
    cache_merge.add_argument("sources", nargs="+", metavar="DIR")
    cache_merge.add_argument(
        "--into", required=True, metavar="DIR", help="the cache to join them into (new, or one of them)"
    )
    _add_no_wait_arg(cache_merge)

    merge = verbs.add_parser(
        "merge",
        help="merge a LoRA adapter into its base and save a plain transformers model",
    )
    merge.add_argument(
        "--adapter",
        required=True,
        help="a train run directory (RUN or RUN/adapter) or any PEFT LoRA adapter directory",
    )
    merge.add_argument(
        "--out", required=True, help="where the merged model goes (must not exist, unless --overwrite)"
    )
    merge.add_argument(
        "--base", help="base model path or hub name (default: adapter_config.json's base_model_name_or_path)"
    )
    merge.add_argument(
        "--mode",
        choices=("nf4-dequantized", "original"),
        help="default: nf4-dequantized, the base the QLoRA adapter was trained against "
        "(original when the run trained on an unquantized base)",
    )
    merge.add_argument(
        "--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="dtype of the merged weights"
    )
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    merge.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the merged model is built: auto (default) keeps it on the GPU only when it "
        "fits the GPU's free memory, else builds the merged layers on the CPU",
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (only once the new one is complete)",
    )
    _add_quiet_arg(merge)

    demo = verbs.add_parser(
        "demo",
        help="the whole pipeline on an embedded tiny model (CPU, no downloads)",
    )
    demo.add_argument("--workdir", default="runs/demo", help="where the demo writes everything")
    _add_quiet_arg(demo)

    data = verbs.add_parser("data", help="check preference data before any model work")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    data_check = data_verbs.add_parser(
        "check",
        help="run the validation pass of precompute-ref and train alone and print its report "
        "(drops by reason, with lines); exit 2 when a split has no usable pair",
    )
    _add_config_args(data_check)

    report = verbs.add_parser(
        "report", help="report.png (training curves) and report.md (run summary, health warnings)"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a train.output_dir (holds metrics.jsonl)")

    plan = verbs.add_parser(
        "plan", help="estimate the peak GPU memory of a training config from the model's config.json"
    )
    plan.add_argument("--model-config", help="the model's config.json (default: from model.name_or_path)")
    plan.add_argument("--gpu-gib", type=float, default=24.0, help="memory of the card to check against")
    plan.add_argument(
        "--find-max-length",
        action="store_true",
        help="print the longest data.max_length that fits the card at the config's micro-batch",
    )
    _add_config_args(plan)
    return _use_help_formatter(parser)
