"""`tunejob import simpletuner ...`: turn another trainer's configuration into a job file.

The conversion is in simpletuner.py, the key table in keymap.py. Torch-free.
"""

from __future__ import annotations

import sys
from pathlib import Path

from job.atomic import write_text_atomic
from job.errors import EXIT_BAD_JOB, ConfigError


def run_simpletuner_import(config: str, backends: str | None, output: str | None,
                           drop_unsupported: bool) -> int:
    """Convert, report what was left out, write the job, say what validate will think."""
    from job.importers.simpletuner import convert, job_text

    conv = convert(Path(config), Path(backends) if backends else None)
    if conv.unmapped:
        print(f"tunejob import: {len(conv.unmapped)} setting(s) not converted:", file=sys.stderr)
        for item in conv.unmapped:
            print(f"  {item.text()}", file=sys.stderr)
        if not drop_unsupported:
            print("nothing written: pass --drop-unsupported to write the job without them "
                  "(they are then listed at its top)", file=sys.stderr)
            return EXIT_BAD_JOB
    text = job_text(conv)
    if output:
        try:
            write_text_atomic(Path(output), text)  # an earlier file stays whole on failure
        except OSError as err:
            raise ConfigError(f"cannot write {output}: {err}", "write to a folder that exists "
                              "and is writable, or leave out -o for standard output") from None
        print(f"tunejob import: wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    _say_what_validate_thinks(text, output or "job.toml", conv.notes)
    return 0


def _say_what_validate_thinks(text: str, name: str, notes: list[str]) -> None:
    """Print the conversion's notes, then run the job loader so a bad value is named now."""
    from job.jobfile import load_job

    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        _, warnings = load_job(name, text=text)
    except ConfigError as err:
        print(f"note: `tunejob validate` rejects this job as written:\n{err}", file=sys.stderr)
        return
    for warning in warnings:
        print(f"note: {warning}", file=sys.stderr)
    print(f"note: `tunejob validate {name}` accepts this job", file=sys.stderr)
