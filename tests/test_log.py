"""The log on a terminal: log lines and the progress bar share stderr without mixing."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest

import job
from job.log import Progress, get_logger, quiet_libraries, setup_logging


class Terminal(io.StringIO):
    """A stream that says it is a TTY, and shows what a terminal would: each line as left
    after carriage returns and erase-to-end-of-line."""

    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        lines = []
        for raw in self.getvalue().split("\n"):
            shown = ""
            for part in raw.split("\r"):  # each part is written from column 0
                if part.startswith("\x1b[K"):
                    shown, part = "", part[len("\x1b[K"):]
                shown = part + shown[len(part):]
            lines.append(shown)
        return lines


def test_a_log_line_replaces_the_bar_and_the_bar_comes_back_below(restore_logging) -> None:
    term = Terminal()
    setup_logging(stream=term, json_lines=False)
    bar = Progress("train", 4, stream=term)
    bar.update(1, loss="1.0314")
    get_logger().info("step", step=1)
    bar.update(1, loss="0.9")
    bar.close()
    screen = [line for line in term.screen() if line]
    assert "step" in screen[0] and "train [" not in screen[0]  # whole, not glued to the bar
    assert screen[1].lstrip().startswith("train [") and "2/4" in screen[1]
    assert len(screen) == 2


def test_json_logs_on_a_terminal_get_progress_events_and_no_control_codes(
        restore_logging) -> None:
    term = Terminal()
    setup_logging(stream=term, json_lines=True)  # --json-logs on a terminal
    bar = Progress("train", 2, stream=term, every_s=0.0)
    bar.update(1)
    get_logger().info("step", step=1)
    bar.update(1)
    lines = term.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["progress", "step", "progress"]
    assert "\x1b" not in term.getvalue() and "\r" not in term.getvalue()


def test_a_pipe_gets_plain_json_lines(restore_logging) -> None:
    pipe = io.StringIO()
    setup_logging(stream=pipe, json_lines=True)
    get_logger().info("step", step=1)
    assert json.loads(pipe.getvalue())["event"] == "step"


def test_python_warnings_become_events_but_a_librarys_syntax_warnings_are_dropped(
        restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # put back after
    pipe = io.StringIO()
    setup_logging(stream=pipe, json_lines=True)
    quiet_libraries()
    ours = str(Path(job.__file__).parent / "run.py")
    library = "/site-packages/torchao/quantization/quant_api.py"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("invalid escape sequence '\\.'", SyntaxWarning, library, 9)
        warnings.warn_explicit("invalid escape sequence '\\d'", SyntaxWarning, ours, 5)
        warnings.warn_explicit("torch_dtype is deprecated", FutureWarning, library, 7)
    said = [json.loads(line) for line in pipe.getvalue().splitlines()]
    assert [(e["category"], e["where"]) for e in said] == [
        ("SyntaxWarning", f"{ours}:5"), ("FutureWarning", f"{library}:7")]


def test_the_jobs_own_source_compiles_without_syntax_warnings() -> None:
    for path in sorted(Path(job.__file__).parent.rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SyntaxWarning)
            compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_a_readable_log_rounds_floats_and_json_keeps_every_digit(restore_logging) -> None:
    term = Terminal()
    setup_logging(stream=term, json_lines=False)
    get_logger().info("step", loss=0.9842857122421265, grad_norm=0.20442171394824982, step=3)
    line = term.getvalue()
    assert "loss=0.9843" in line and "grad_norm=0.2044" in line and "step=3" in line
    pipe = io.StringIO()
    setup_logging(stream=pipe, json_lines=True)
    get_logger().info("step", loss=0.9842857122421265)
    assert json.loads(pipe.getvalue())["loss"] == 0.9842857122421265


def test_the_eta_forgets_a_slow_start(restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first step that compiles for 5 minutes, then a step a second: a minute later the
    rate is the steps' own (1/s), not an average since the start (0.2/s at step 60)."""
    import job.log as log_module

    clock = [1000.0]
    monkeypatch.setattr(log_module.time, "monotonic", lambda: clock[0])
    pipe = io.StringIO()
    setup_logging(stream=pipe, json_lines=True)
    bar = Progress("train", 1000, stream=pipe, every_s=0.0)
    clock[0] += 300.0
    bar.update(1)
    for _ in range(70):
        clock[0] += 1.0
        bar.update(1)
    last = json.loads(pipe.getvalue().splitlines()[-1])
    assert last["done"] == 71 and last["rate_per_s"] == pytest.approx(1.0)
    assert last["eta_s"] == pytest.approx(929.0)
    first = json.loads(pipe.getvalue().splitlines()[0])
    assert first["rate_per_s"] == pytest.approx(1 / 300, abs=1e-3)  # nothing better known yet
