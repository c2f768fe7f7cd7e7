"""The `lora-dpo` command: precompute-ref, train, eval, generate, demo.

Every mistake the user can make, and every damaged or missing file, ends in one line on
stderr starting with `error:` and exit code 2, never a traceback; argparse's usage errors
too (`error: <message> (see lora-dpo VERB --help)`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lora_dpo.errors import ConfigError, LoraDpoError, TrainingInterrupted
from lora_dpo.versions import package_versions

log = logging.getLogger("lora_dpo")

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the verb's own parser, so that the hint names its --help
            _verb_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.verb is None and not args.version:
            parser.error(f"give a VERB: {', '.join(_verbs(parser))}")
    except SystemExit as exc:  # --help (0), or a usage error already printed (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.version:
        for name, version in package_versions().items():
            print(f"{name} {version}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per hub request
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar, ours and the libraries'
    try:
        return _run(args)
    except TrainingInterrupted as exc:
        return _stop(str(exc), 128 + signal.Signals[exc.signal_name])
    except LoraDpoError as exc:
        return _stop(f"error: {exc}", 2)
    except KeyboardInterrupt:
        return _stop("interrupted", 130)
    except Exception as exc:
        message = _environment_error(exc, getattr(args, "writing", None))
        if message is None:
            raise  # a bug: the traceback is what is needed
        return _stop(f"error: {message}", 2)


def _stop(line: str, code: int) -> int:
    """The last word, on a line of its own: progress bars the error cut short are closed first
    (else the line would continue a bar, and the bar be redrawn after it)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    print(line, file=sys.stderr)
    return code


def _verbs(parser: argparse.ArgumentParser) -> list[str]:
    return next(list(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _verb_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)verb `args` were parsed for, e.g. `lora-dpo cache info`'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None):
            return _verb_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _environment_error(exc: Exception, writing: str | None) -> str | None:
    """One line for a full disk, or for an OS error on a named path (a file where a directory
    should be, no permission); None for anything else. Every write goes through
    lora_dpo.fileio (temp file or directory, then rename), so what was there before is intact."""
    from lora_dpo.fileio import full_disk_message

    full = full_disk_message(exc, writing)
    if full is not None:
        return full
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and exc.errno is not None and filename:
        also = f" -> {exc.filename2}" if exc.filename2 else ""
        return f"{filename}{also}: {exc.strerror}"
    return None


def _run(args: argparse.Namespace) -> int:
    from lora_dpo.config import load_config
    from lora_dpo.distributed import init_distributed, launched_by_torchrun, shutdown

    args.writing = (
        getattr(args, "out", None)
        or getattr(args, "into", None)
        or getattr(args, "workdir", None)
        or getattr(args, "run_dir", None)
    )
    if args.verb == "report":
        from lora_dpo.report import write_report

        result = write_report(args.run_dir)
        print(f"report: {result.markdown}\nplot:   {result.png}")
        return 0
    if args.verb == "demo":
        from lora_dpo.demo import run_demo

        run_demo(args.workdir)
        return 0
    if args.verb == "cache":
        return _run_cache(args)
    if args.verb == "merge":
        from lora_dpo.merge import merge

        merge(
            args.adapter,
            args.out,
            base=args.base,
            mode=args.mode,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
        return 0
    if getattr(args, "resume", None):
        from lora_dpo.run.directory import RunDirectory

        run_dir = Path(args.resume)  # its config, or an interrupted overwrite's (in a hidden sibling)
        saved = RunDirectory(run_dir).resume_source().config_path
        config = load_config(saved, [*args.overrides, f"train.output_dir={run_dir}"])
    else:
        config = load_config(args.config, args.overrides)
    args.writing = {
        "precompute-ref": config.precompute.cache_dir,
        "train": config.train.output_dir,
        "sweep": config.train.output_dir,
    }.get(args.verb)
    if args.verb == "plan":
        from lora_dpo.plan import run_plan

        print(run_plan(config, args.model_config, args.gpu_gib, args.find_max_length))
        return 0
    if args.verb == "data":
        from lora_dpo.data_check import run_data_check

        return run_data_check(config)
    if launched_by_torchrun():
        if args.verb not in ("precompute-ref", "train"):
            raise ConfigError(f"{args.verb} runs in one process; torchrun is for precompute-ref and train")
        if not init_distributed().is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one log per job, from rank 0
    try:
        return _run_stage(args, config)
    finally:
        shutdown()


def _run_stage(args: argparse.Namespace, config: Any) -> int:
    if args.verb == "precompute-ref":
        from lora_dpo.cache import build_cache

        build_cache(config, rebuild=args.rebuild, wait=not args.no_wait)
    elif args.verb == "train":
        from lora_dpo.train import train

        train(config, resume=bool(args.resume))
    elif args.verb == "sweep":
        from lora_dpo.sweep import run_sweep, sweep_axes

        run_sweep(config, sweep_axes(args.set, args.betas))
    elif args.verb == "generate":
        from lora_dpo.generate import cli_settings, generate_run
        from lora_dpo.samples import samples_markdown

        settings = cli_settings(
            max_new_tokens=args.max_new_tokens,
            sample=args.sample,
            seed=args.seed,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
        )
        if args.prompts < 1:
            raise ConfigError(f"--prompts {args.prompts}: must be >= 1")
        samples, out_dir = generate_run(
            config, args.adapter, prompts=args.prompts, settings=settings, out=args.out
        )
        print("\n".join(samples_markdown(samples, limit=3)))
        print(f"samples: {out_dir / 'samples.jsonl'}, {out_dir / 'samples.md'}")
    elif args.verb == "eval":
        from lora_dpo.evaluate import evaluate_run

        metrics = evaluate_run(config, args.adapter, base=args.base)
        for key, value in metrics.to_dict().items():
            print(f"{key}: {value:.4f}")
    return 0


def _run_cache(args: argparse.Namespace) -> int:
    from lora_dpo import cache

    if args.cache_verb == "info":
        plot = None if args.plot is None else Path(args.plot or cache.default_plot_path(args.cache_dir))
        print(cache.describe_cache(args.cache_dir, plot=plot))
        return 0
    if args.cache_verb == "export":
        rows = cache.export_cache(args.cache_dir, args.out)
        print(f"cache export: {rows} pairs from {args.cache_dir} -> {args.out}")
        return 0
    if args.cache_verb in ("import", "merge"):
        if args.cache_verb == "import":
            added = cache.import_cache(args.file, args.into, wait=not args.no_wait)
        else:
            added = cache.merge_caches(args.sources, args.into, wait=not args.no_wait)
        print(f"cache {args.cache_verb}: {added} pairs added to {args.into}")
        return 0
    problems, pairs = cache.verify_cache(args.cache_dir)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    manifest = cache.Manifest.read(Path(args.cache_dir))
    for stray in cache.unlisted_shards(Path(args.cache_dir), manifest):
        print(
            f"note: {stray} is not listed in the manifest (left by an interrupted write; the next write removes it)"
        )
    if problems:
        print(f"cache verify: {len(problems)} problem(s) in {args.cache_dir}", file=sys.stderr)
        return 1
    print(f"cache verify: {args.cache_dir} is sound ({pairs} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
