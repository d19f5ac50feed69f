"""The bad-input suite: every case of tests/bad_inputs/cases.toml through the real CLI.

Each case is jobs/smoke.toml with the case's edits, every folder under its own tmp dir
(TUNEJOB_DATA), the hub offline, run as `python -m job run JOB.toml` in a subprocess. A
user error must end with its documented exit code, one paragraph that names the key or
file and the fix, no traceback, and no output that a later run could take for real.

The module fixture `outcomes` runs the selected cases two at a time (the machines that run
the tests may have two cores). Cases refused while the job file is read (stage "load")
take half a second each and run with a `torch` that cannot be imported, which proves the
refusal comes before torch (DESIGN.md, lifecycle step 1). The other cases start a run and
load the tiny SDXL, built once into a shared models folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from job.metrics import validate_summary

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "jobs" / "smoke.toml"
SUITE = Path(__file__).resolve().parent / "bad_inputs"
CASES: list[dict[str, Any]] = tomllib.loads((SUITE / "cases.toml").read_text())["case"]
# smoke.toml's one line that says where models live; every case points it at models_dir.
HUB_LINE = 'hub_cache_dir = "${TUNEJOB_DATA:-/data}/models"'
DATASET = "datasets/smoke-shapes"  # smoke.toml's instance_data_dir under TUNEJOB_DATA
TIMEOUT_S = 300
WORKERS = 2
# What a stage "load" case may leave in its folder: its own inputs, nothing written by the job.
INPUTS = {"job.toml", "datasets", "weights", "earlier-run"}
TORCH_IMPORTED = "torch-was-imported"
POISONED_TORCH = f'''"""Stands in for torch while a job file is read: importing it is a bug."""
from pathlib import Path
Path({TORCH_IMPORTED!r}).write_text("imported while the job file was read")
raise ImportError("torch was imported while the job file was read")
'''


# -- data layouts ---------------------------------------------------------------------------

def _image(path: Path, colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    Image.new("RGB", (96, 96), colour).save(path)
    return path


def _captioned(folder: Path, stems: list[str]) -> None:
    for i, stem in enumerate(stems):
        _image(folder / f"{stem}.png", (40 * i, 100, 200))
        (folder / f"{stem}.txt").write_text(f"a square number {i}\n")


def _corrupt_all(folder: Path) -> None:
    for stem in ("a", "b", "c"):
        (folder / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
        (folder / f"{stem}.txt").write_text("a red square\n")


def _zero_byte_all(folder: Path) -> None:
    for name in ("a.jpg", "b.png", "c.webp"):
        (folder / name).write_bytes(b"")
        (folder / name).with_suffix(".txt").write_text("a red square\n")


def _truncated_all(folder: Path) -> None:
    for stem in ("a", "b", "c"):
        whole = _image(folder / f"{stem}.png").read_bytes()
        (folder / f"{stem}.png").write_bytes(whole[: len(whole) // 2])
        (folder / f"{stem}.txt").write_text("a red square\n")


def _corrupt_some(folder: Path) -> None:
    _captioned(folder, ["good0", "good1", "good2", "good3"])
    (folder / "bad.png").write_bytes(b"not an image at all")
    (folder / "bad.txt").write_text("a broken file\n")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "zero.txt").write_text("an empty file\n")


def _captions_missing(folder: Path) -> None:
    for stem in ("a", "b", "c"):
        _image(folder / f"{stem}.png")


def _captions_empty(folder: Path) -> None:
    for stem, text in (("a", ""), ("b", "  \n"), ("c", "\ufeff\n")):
        _image(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(text)


def _captions_other_extension(folder: Path) -> None:
    for stem in ("a", "b", "c"):
        _image(folder / f"{stem}.png")
        (folder / f"{stem}.caption").write_text("a red square\n")


def _no_image_files(folder: Path) -> None:
    (folder / "README.txt").write_text("the images are elsewhere\n")
    Image.new("RGB", (96, 96)).save(folder / "anim.gif")
    Image.new("RGB", (96, 96)).save(folder / "scan.tiff")
    (folder / ".hidden").mkdir()
    _image(folder / ".hidden" / "cache.png")


def _weights_without_model_index(folder: Path) -> None:
    weights = folder.parent.parent / "weights"
    weights.mkdir()
    (weights / "sdxl.safetensors").write_bytes(b"\0" * 64)


LAYOUTS: dict[str, Callable[[Path], None]] = {
    "empty": lambda folder: None,
    "corrupt_all": _corrupt_all,
    "zero_byte_all": _zero_byte_all,
    "truncated_all": _truncated_all,
    "corrupt_some": _corrupt_some,
    "captions_missing": _captions_missing,
    "captions_empty": _captions_empty,
    "captions_other_extension": _captions_other_extension,
    "no_image_files": _no_image_files,
    "weights_folder_without_model_index": _weights_without_model_index,
}


# -- building and running one case ----------------------------------------------------------

@dataclass
class Outcome:
    """What one case's run left: exit code, output, and its TUNEJOB_DATA folder."""

    returncode: int
    stdout: str
    stderr: str
    root: Path


def job_text(case: dict[str, Any], models_dir: Path) -> str:
    """smoke.toml with the models folder redirected and the case's text edits."""
    text = SMOKE.read_text()
    edits = [(HUB_LINE, f"hub_cache_dir = {json.dumps(str(models_dir))}")]
    edits += [tuple(pair) for pair in case.get("replace", [])]
    for old, new in edits:
        count = text.count(old)
        assert count == 1, f"{case.get('id')}: {old!r} occurs {count} times in {SMOKE}"
        text = text.replace(old, new)
    if "drop_table" in case:
        text = _drop_table(text, case["drop_table"])
    return text


def _drop_table(text: str, header: str) -> str:
    """Remove the table `header` and its lines up to the next table header."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("["):
            dropping = line.strip() == header
        if not dropping:
            kept.append(line)
    assert len(kept) < len(text.splitlines()), f"no {header} table in {SMOKE}"
    return "".join(kept)


def run_case(case: dict[str, Any], root: Path, models_dir: Path, no_torch: Path) -> Outcome:
    """Write the case's job file and data under root and run the real CLI on it."""
    job_path = root / "job.toml"
    job_path.write_text(job_text(case, models_dir))
    if "layout" in case:
        folder = root / DATASET
        folder.mkdir(parents=True)
        LAYOUTS[case["layout"]](folder)
    if case.get("job_file") == "missing":
        job_path = root / "no-such-job.toml"
    elif case.get("job_file") == "run-folder":
        job_path = root / "earlier-run"
        job_path.mkdir()
        (job_path / "job.resolved.toml").write_text(job_text(case, models_dir))
    elif case.get("job_file") == "latin-1":
        first, rest = job_path.read_text().split("\n", 1)
        job_path.write_bytes(f"{first}\n# r\u00e9glages du smoke\n{rest}".encode("latin-1"))
    argv = [sys.executable, "-m", "job", "run", str(job_path)]
    for item in case.get("set", []):
        argv += ["--set", item]
    env = {**os.environ, "TUNEJOB_DATA": str(root), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    env.pop("TUNEJOB_NO_SUCH_VAR", None)
    if case["stage"] == "load":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(no_torch),
                                                          env.get("PYTHONPATH")]))
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    return Outcome(done.returncode, done.stdout, done.stderr, root)


def _build_tiny_model(models_dir: Path) -> None:
    """The tiny SDXL in models_dir, built once in a subprocess (as a run would build it)."""
    code = ("import sys; from pathlib import Path; from job.models.sdxl_tiny import "
            "ensure_tiny_sdxl; ensure_tiny_sdxl(Path(sys.argv[1]) / 'tunejob-tiny' / 'sdxl')")
    done = subprocess.run([sys.executable, "-c", code, str(models_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"building the tiny SDXL failed:\n{done.stderr[-3000:]}"


def _needs_model(case: dict[str, Any]) -> bool:
    return case["stage"] != "load"


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Run the selected cases, two at a time: the quick load cases while the tiny model is
    built, then the cases that start a run."""
    selected = {item.callspec.params["case"]["id"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")
                and "case" in item.callspec.params}
    cases = [c for c in CASES if c["id"] in selected]
    models_dir = tmp_path_factory.mktemp("models")
    no_torch = tmp_path_factory.mktemp("no-torch")
    (no_torch / "torch").mkdir()
    (no_torch / "torch" / "__init__.py").write_text(POISONED_TORCH)
    roots = {case["id"]: tmp_path_factory.mktemp(case["id"]) for case in cases}
    results: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        built = pool.submit(_build_tiny_model, models_dir) \
            if any(map(_needs_model, cases)) else None

        def task(case: dict[str, Any]) -> Outcome:
            if _needs_model(case):
                built.result()
            return run_case(case, roots[case["id"]], models_dir, no_torch)

        # The quick cases first, then the one that trains (the longest), then the rest.
        for case in sorted(cases, key=lambda c: (_needs_model(c), c["stage"] != "ok")):
            results[case["id"]] = pool.submit(task, case)
    return {case_id: future.result() for case_id, future in results.items()}


# -- reading what a run said ----------------------------------------------------------------

def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log events on stderr (the log is JSON lines when stderr is not a terminal)."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def failure_message(stderr: str) -> str:
    """The paragraph the user reads: the closing `tunejob: ...` text, whether the job file
    was refused or the run failed ("" when there is none)."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("tunejob: ")]
    return "\n".join(lines[starts[-1]:]).strip() if starts else ""


# -- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case: dict[str, Any], outcomes: dict[str, Outcome]) -> None:
    got = outcomes[case["id"]]
    tail = got.stderr[-3000:]
    assert got.returncode == case["exit"], f"exit {got.returncode}, not {case['exit']}\n{tail}"
    for stream in (got.stdout, got.stderr):
        assert "traceback" not in stream.lower(), stream[-3000:]
    if case["stage"] == "ok":
        _check_succeeded_despite(case, got)
        return
    message = failure_message(got.stderr)
    assert message, f"no failure message on stderr\n{tail}"
    assert "\n\n" not in message, f"not one paragraph:\n{message}"
    assert "fix: " in message and message.split("fix: ", 1)[1].strip(), message
    for name in case["names"]:
        assert name in message, f"message does not name {name!r}:\n{message}"
    _check_no_output_to_mistake(case, got.root, message, got.stderr)


def _check_no_output_to_mistake(case: dict[str, Any], root: Path, message: str,
                                got_stderr: str) -> None:
    """Refused at load: nothing written, torch never imported. Failed in the run: a failed
    summary.json with the message the user read, and no checkpoint, validation image or
    final weights."""
    if case["stage"] == "load":
        # Empty folders may be left: the output and cache folders are made while they are
        # proved writable.
        left = sorted(p.name for p in root.iterdir() if p.name in INPUTS or not p.is_dir()
                      or any(q.is_file() for q in p.rglob("*")))
        assert set(left) <= INPUTS, f"a refused job file left {left} (torch imported: " \
                                    f"{TORCH_IMPORTED in left})"
        return
    # The run said it started (before torch loaded) and where it writes.
    started = [e for e in events(got_stderr) if e.get("event") == "job_started"]
    assert len(started) == 1 and started[0]["output"] == str(root / "output" / "smoke")
    jobs = sorted((root / "output").iterdir())
    assert [p.name for p in jobs] == ["smoke"], jobs
    made = {p.name for p in jobs[0].iterdir()}
    assert not {"checkpoints", "final", "validation"} & made, made
    summary = json.loads((jobs[0] / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "failed" and summary["exit_code"] == case["exit"], summary
    assert summary["error"]["hint"] and not summary["checkpoints"], summary
    assert summary["error"]["message"] in message and summary["error"]["hint"] in message


def _check_succeeded_despite(case: dict[str, Any], got: Outcome) -> None:
    """The run finished, and the files it skipped are listed in the log."""
    summary = json.loads((got.root / "output" / "smoke" / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "succeeded", summary
    listed = [e for e in events(got.stderr) if e.get("event") == "images_skipped"]
    assert listed, got.stderr[-3000:]
    files = " ".join(listed[0]["files"])
    for name in case["skipped"]:
        assert name in files, f"{name} not listed as skipped: {files}"
    ready = [e for e in events(got.stderr) if e.get("event") == "data_ready"][0]
    assert ready["skipped"] == len(case["skipped"]), ready


def test_table_has_every_category_three_times() -> None:
    per_category: dict[str, int] = {}
    for case in CASES:
        per_category[case["category"]] = per_category.get(case["category"], 0) + 1
        assert case["exit"] in (0, 2, 3) and case["stage"] in ("load", "run", "ok"), case
        assert case["stage"] == "ok" or case["names"], case
        assert case["stage"] != "load" or case["exit"] == 2, case  # DESIGN.md, lifecycle 1
        assert case.get("layout", "empty") in LAYOUTS, case
    assert len(CASES) >= 40 and len({c["id"] for c in CASES}) == len(CASES)
    assert min(per_category.values()) >= 3, per_category


def test_readme_is_generated_from_the_cases() -> None:
    spec = importlib.util.spec_from_file_location("make_readme", SUITE / "make_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (SUITE / "README.md").read_text() == module.render(CASES), \
        "tests/bad_inputs/README.md is stale: run python tests/bad_inputs/make_readme.py"
