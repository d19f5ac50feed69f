"""Write README.md in this folder from cases.toml: `python tests/bad_inputs/make_readme.py`.

tests/test_bad_inputs.py fails while README.md differs from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
STAGES = {"load": "refused while the job file is read (before torch is imported); no file "
                  "written",
          "run": "found after the run started; `summary.json` says `failed`, no checkpoint, "
                 "image or final weights",
          "ok": "not an error: the run succeeds and lists the skipped files in the log"}

HEADER = """# The bad-input suite

Malformed job files and data layouts, each with the exit code it must give and what its
message must name. `tests/test_bad_inputs.py` runs every case in `cases.toml` through the
real CLI (`python -m job run JOB.toml`, hub offline) and checks:

- the exit code (DESIGN.md: 2 the job file or its inputs are wrong, 3 a data problem found
  at run time, 0 for a run that succeeds despite bad files);
- one closing paragraph on stderr, `tunejob: <what, where>` then `  fix: <how>`, that
  contains every text listed under "message names";
- no Python traceback on stdout or stderr;
- no output a later run could take for real: a job refused while its file is read writes
  no file (at most an empty output or cache folder, made while proving it writable) and
  does not import torch; a run that fails writes only
  `job.resolved.toml`, `metrics.jsonl` and a `summary.json` with status `failed`, its
  exit code and the fix, with no `checkpoints/`, `validation/` or `final/`.

Each case is `jobs/smoke.toml` with the edit described. This file is generated from
`cases.toml` by `make_readme.py`; a test fails when it is stale.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(cases: list[dict[str, Any]]) -> str:
    """The README text: a summary of the categories, then one table per category."""
    categories: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        categories.setdefault(case["category"], []).append(case)
    lines = [HEADER, f"{len(cases)} cases in {len(categories)} categories.", "",
             "| category | cases | exit codes | found |", "| --- | --- | --- | --- |"]
    for name, members in categories.items():
        codes = ", ".join(str(c) for c in sorted({m["exit"] for m in members}))
        stages = ", ".join(sorted({m["stage"] for m in members}))
        lines.append(f"| {name} | {len(members)} | {codes} | {stages} |")
    lines += ["", "Found:", ""] + [f"- `{k}`: {v}." for k, v in STAGES.items()]
    for name, members in categories.items():
        lines += ["", f"## {name}", "", "| case | what is wrong | exit | message names |",
                  "| --- | --- | --- | --- |"]
        for case in members:
            names = ", ".join(f"`{_cell(n.strip())}`" for n in case["names"]) or (
                "skipped files listed: " + ", ".join(f"`{f}`" for f in case["skipped"]))
            lines.append(f"| `{case['id']}` | {_cell(case['what'])} | {case['exit']} | "
                         f"{names} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    cases = tomllib.loads((HERE / "cases.toml").read_text(encoding="utf-8"))["case"]
    (HERE / "README.md").write_text(render(cases), encoding="utf-8")


if __name__ == "__main__":
    main()
