"""The demo's progress display: redrawn in place on a terminal, plain lines in order elsewhere."""

from __future__ import annotations

import io
import re
import threading

from twopc.testing.playground.bank import ABORTED, COMMITTED
from twopc.testing.playground.demo import Progress, show_progress


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Output(io.StringIO):
    """What the display writes; ``line_written`` is set once a progress line is out."""

    def __init__(self) -> None:
        super().__init__()
        self.line_written = threading.Event()

    def write(self, text: str) -> int:
        if "transfers" in text:
            self.line_written.set()
        return super().write(text)


def moment(line: str) -> float:
    """The time a plain line starts with (after the '!' of an event)."""
    found = re.match(r"\s*(?:! +)?([\d.]+)s  ", line)
    assert found is not None, line
    return float(found.group(1))


def run(*, live: bool) -> str:
    """Six transfers and two events in two steps; the second step waits until the display has
    written a progress line, so that the run is shown at least twice."""
    clock = ManualClock()
    progress = Progress(clock)
    out = Output()

    def transfers() -> None:
        clock.now = 1.0
        progress.note("coordinator SIGKILLed")
        for outcome in (COMMITTED, COMMITTED, ABORTED):
            progress.done(outcome)
        assert out.line_written.wait(30)
        clock.now = 2.5
        progress.note("coordinator restarted")
        for _ in range(3):
            progress.done(COMMITTED)

    runner = threading.Thread(target=transfers)
    runner.start()
    show_progress(runner, progress, 6, out, live=live, every=1.0)
    runner.join()
    return out.getvalue()


def test_not_a_terminal_gives_plain_lines_in_order() -> None:
    text = run(live=False)
    assert "\r" not in text
    assert text.endswith("\n")
    lines = text.splitlines()
    moments = [moment(line) for line in lines]
    assert moments == sorted(moments), text
    events = [line.strip() for line in lines if line.lstrip().startswith("!")]
    assert events == ["!   1.0s  coordinator SIGKILLed", "!   2.5s  coordinator restarted"]
    progress_lines = [line for line in lines if "transfers" in line]
    assert len(progress_lines) >= 2
    assert re.search(r"transfers +6/6 +committed +5 +aborted +1 ", progress_lines[-1])
    assert lines.index(f"  {events[1]}") < lines.index(progress_lines[-1])


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    text = run(live=True)
    assert text.startswith("\r")
    assert text.count("\n  ! ") == 2
    last = r"\r +2\.5s  transfers +6/6 [^\n]*\n  !   2\.5s  coordinator restarted\n$"
    assert re.search(last, text)
