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
from typing import Any

from lora_dpo.arguments import build_parser
from lora_dpo.errors import ConfigError, LoraDpoError, TrainingInterrupted
from lora_dpo.versions import package_versions

log = logging.getLogger("lora_dpo")


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
            device=args.device,
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
        if args.verb not in ("precompute-ref", "train", "eval"):
            raise ConfigError(
                f"{args.verb} runs in one process; torchrun is for precompute-ref, train and eval"
            )
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
        from lora_dpo.distributed import dist_info
        from lora_dpo.evaluate import evaluate_run

        metrics = evaluate_run(config, args.adapter, base=args.base)
        if dist_info().is_main:  # one report per job
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
