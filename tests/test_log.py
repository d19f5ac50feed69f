"""The log on a terminal: log lines and the progress bar share stderr without mixing."""

from __future__ import annotations

import io
import json

from job.log import Progress, get_logger, setup_logging


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
