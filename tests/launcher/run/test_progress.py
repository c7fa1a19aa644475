"""launcher.run.progress: a redrawn bar with ETA on a terminal, plain lines elsewhere."""

import io

from launcher.run.progress import Progress, format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_lines_elsewhere() -> None:
    tty = _Terminal()
    bar = Progress(10, "auto", stream=tty)
    bar.update(5)
    bar.write("step=5 loss=1.0")
    bar.close()
    out = tty.getvalue()
    assert "\r" in out and "[###############...............] 5/10" in out and "eta " in out, out
    assert "step=5 loss=1.0\n" in out  # printed above the bar

    pipe = io.StringIO()
    lines = Progress(10, "auto", stream=pipe)
    lines.update(5)
    lines.write("step=5 loss=1.0")
    lines.close()
    assert pipe.getvalue().startswith("step=5 loss=1.0 | 5/10 eta ") and "\r" not in pipe.getvalue()

    forced = _Terminal()
    Progress(10, "lines", stream=forced).write("x")
    assert "\r" not in forced.getvalue()
    silent = _Terminal()
    off = Progress(10, "bar", enabled=False, stream=silent)
    off.update(3)
    off.write("x")
    off.close()
    assert silent.getvalue() == ""  # ranks other than 0


def test_eta_and_durations() -> None:
    p = Progress(100, "lines", stream=io.StringIO(), start=40)
    assert p.eta_s() is None  # nothing done yet since the start (a resumed run counts from 40)
    p._start_time -= 6.0  # 6 s for 20 steps
    p.update(60)
    assert abs(p.eta_s() - 12.0) < 0.5
    assert [format_duration(s) for s in (7, 123, 3723)] == ["0:07", "2:03", "1:02:03"]
