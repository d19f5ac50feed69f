"""`tunejob run | validate | cache JOB.toml [--set table.key=value ...]`, `tunejob import ...`.

Errors the user can fix print one paragraph (what, where, the fix) and exit 2 or 3;
`validate` never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from job import __version__
from job.errors import EXIT_OTHER, EXIT_PREEMPTED, JobError, ensure_writable
from job.log import get_logger, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="tunejob", description="Fine-tuning job for "
                                     "diffusion models, configured by one TOML file.")
    parser.add_argument("--version", action="version", version=f"tunejob {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "train: cache, train, validate, export"),
                       ("validate", "check the job file only (exit 0 or 2)"),
                       ("cache", "fill the text-embedding and latent caches, then stop"),
                       ("export", "write the job's trained weights in another form: --merge "
                        "writes the base model with the final LoRA merged in")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job", help="path of the job's TOML file")
        cmd.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="TABLE.KEY=VALUE", help="override one setting (repeatable)")
        cmd.add_argument("--json-logs", action="store_true", default=None,
                         help="one JSON object per log line even on a terminal")
        if name == "export":
            cmd.add_argument("--merge", action="store_true",
                             help="merge the LoRA into the base model (a pipeline folder)")
            cmd.add_argument("--adapter", default=None,
                             help="folder of the trained LoRA (default: OUTPUT/final)")
            cmd.add_argument("-o", "--output", default=None,
                             help="folder to write (default: OUTPUT/final-merged)")
            cmd.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                             help="dtype of the saved weights; the merge itself is done in "
                                  "fp32 (default: fp32)")
    source = sub.add_parser("import", help="convert another trainer's configuration into a "
                            "job file").add_subparsers(dest="source", required=True)
    simpletuner = source.add_parser(
        "simpletuner", help="config.json [+ multidatabackend.json] -> job.toml (exit 2 listing "
        "every setting that cannot be converted, unless --drop-unsupported)")
    simpletuner.add_argument("config", help="SimpleTuner's config.json")
    simpletuner.add_argument("multidatabackend", nargs="?", default=None,
                             help="its multidatabackend.json (default: data_backend_config)")
    simpletuner.add_argument("-o", "--output", default=None,
                             help="job file to write (default: standard output)")
    simpletuner.add_argument("--drop-unsupported", action="store_true",
                             help="write the job anyway, listing what was left out at its top")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunejob` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(json_lines=getattr(args, "json_logs", None))
    log = get_logger()
    try:
        if args.command == "import":
            from job.importers import run_simpletuner_import

            return run_simpletuner_import(args.config, args.multidatabackend, args.output,
                                          args.drop_unsupported)
        from job.jobfile import load_job

        cfg, warnings = load_job(args.job, args.overrides)
        if args.command == "validate":
            for note in warnings:
                log.warning("setting_note", note=note)
            _say_missing_data(cfg)
            log.info("job_valid", job=args.job, name=cfg.job.name, family=cfg.model.family)
            return 0
        if args.command in ("run", "cache"):
            # Where the job writes, proven writable before torch is imported.
            ensure_writable(Path(cfg.output_path()), "job.output_dir")
            ensure_writable(Path(cfg.cache.dir), "cache.dir")
            for index, ds in enumerate(cfg.datasets):
                if ds.cache_dir_vae and not ds.disabled:
                    ensure_writable(Path(ds.cache_dir_vae), f"datasets[{index}].cache_dir_vae")
            if os.environ.get("RANK", "0") == "0":  # the launcher's rank; one line per job
                # Said before torch loads, which can take a minute on a cold start.
                log.info("job_started", command=args.command, job=args.job, name=cfg.job.name,
                         family=cfg.model.family, flavour=cfg.model.flavour,
                         output=cfg.output_path(), tunejob=__version__)
        if args.command == "cache":
            return _cache_only(cfg)
        if args.command == "export":
            return _export(cfg, args.merge, args.adapter, args.output, args.dtype)
        from job.run import run_job

        return run_job(cfg, warnings)
    except JobError as err:
        log.error("job_failed", error=err.message, hint=err.hint, exit_code=err.exit_code)
        print(f"tunejob: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _say_missing_data(cfg) -> None:
    """validate checks the file; the data may live on a volume this machine lacks, so a
    dataset folder missing here is a warning, which `run` and `cache` would make exit 2."""
    from job.data.discovery import check_present

    for ds in cfg.enabled_datasets():
        if ds.synthetic_images:
            continue  # filled by the run when missing or empty
        try:
            check_present(ds)
        except JobError as err:
            get_logger().warning("dataset_not_found_here", problem=err.message, fix=err.hint,
                                 note="tunejob run and cache stop here with exit 2")


def _export(cfg, merge: bool, adapter: str | None, output: str | None,
            dtype: str = "fp32") -> int:
    """Merge the final LoRA into the base model and write a pipeline folder (atomically)."""
    import torch

    from job.atomic import build_folder, restore_replaced
    from job.errors import ConfigError, DiskFullError
    from job.log import quiet_libraries
    from job.models.registry import family_class

    quiet_libraries()
    if not merge:
        raise ConfigError("tunejob export needs a form to write; the one it writes is --merge "
                          "(final/'s LoRA fused into the base model's pipeline folder, for "
                          "tools that do not load LoRA files)",
                          "add --merge; final/ already holds the LoRA in diffusers format")
    if cfg.model.model_type != "lora":
        raise ConfigError('tunejob export --merge needs a LoRA job (model.model_type = "lora")',
                          "a full fine-tune's final/ folder is already a complete model")
    family = family_class(cfg.model.family)(cfg, torch.device("cpu"), torch.float32)
    out = Path(cfg.output_path())
    source = Path(adapter) if adapter else out / "final"
    if not adapter:
        restore_replaced(source)  # final/ back in place if its swap was killed midway
    if not (source / family.final_lora_file).is_file():
        raise ConfigError(f"{source} holds no trained LoRA ({family.final_lora_file} is missing)",
                          "run the job to its end first, or point --adapter at a final/ folder")
    target = Path(output) if output else out / "final-merged"
    # The target is replaced: only an earlier export (a pipeline folder) or nothing.
    if target.exists() and not (target / "model_index.json").is_file() \
            and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--output {target} exists and is not a pipeline folder an earlier "
                          "export wrote; it would be replaced", "name a new folder with -o")
    if source.resolve().is_relative_to(target.resolve()):
        raise ConfigError(f"--output {target} holds the LoRA being merged ({source})",
                          "name another folder with -o")
    weights = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    build_folder(target, lambda scratch: family.export_merged(source, scratch, weights),
                 lambda err: DiskFullError(
                     f"the volume under {target.parent} filled up while the merged pipeline "
                     f"was written ({type(err).__name__}: {err}); nothing was replaced",
                     "free space there (the merged pipeline is about the base model's size "
                     "at --dtype), or write it elsewhere with -o"))
    get_logger().info("exported", form="merged", adapter=str(source), path=str(target),
                      dtype=dtype)
    return 0


def _cache_only(cfg) -> int:
    """Lifecycle steps 2-4 only."""
    from job.data.prepare import prepare_data
    from job.models.registry import family_class
    from job.log import quiet_libraries
    from job.run import preflight
    from job.speedups import apply_speedups

    quiet_libraries()
    out = Path(cfg.output_path())  # made writable by main()
    device, dtype = preflight(cfg, out)
    family = family_class(cfg.model.family)(cfg, device, dtype)
    family.load()
    # As in a run: quantised text encoders ([speedups]) encode what the fingerprint says.
    apply_speedups(cfg, family)
    try:
        data = prepare_data(cfg, family)
    except Exception as err:
        from job.errors import DiskFullError, disk_was_full

        if not disk_was_full(err, Path(cfg.cache.dir)):
            raise
        raise DiskFullError(f"the cache volume filled up ({type(err).__name__}: {err}); the "
                            "entries written so far are whole and kept",
                            "free space there or point cache.dir at a larger volume, then run "
                            "tunejob cache again: it continues where this one stopped") from None
    get_logger().info("cache_filled", encoded_latents=data.encoded["latents"],
                      encoded_captions=data.encoded["captions"], train_samples=len(data.train),
                      eval_samples=len(data.eval))
    return 0


def entry() -> None:
    """Console-script wrapper: exit with main()'s code."""
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - last resort: a bug is exit 1 with its traceback
        import traceback

        traceback.print_exc()
        sys.exit(EXIT_OTHER)
    if code == EXIT_PREEMPTED:
        # Everything is on disk (checkpoint, metrics, summary.json, all renamed into place);
        # skip the interpreter's teardown, which can take a second with torch loaded, so the
        # exit lands inside the scheduler's grace period.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
