"""Progress of long phases: a tqdm bar on a terminal, plain lines with count and ETA elsewhere (SLURM logs)."""

from __future__ import annotations

import io

import mtssl.utils.progress_bar as progress
from mtssl.utils.progress_bar import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal(monkeypatch):
    out = io.StringIO()
    assert list(progress_bar(range(4), desc="features", unit="batch", file=out)) == [0, 1, 2, 3]
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [line for line in out.getvalue().splitlines() if line.startswith("features")]
    assert len(out.getvalue().splitlines()) == 1 and "4/4" in out.getvalue()  # only the final line: under 30 s
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    list(progress_bar(range(3), desc="probe", unit="epoch", file=out))
    lines = out.getvalue().splitlines()
    assert [line.split("|")[-1].split()[0] for line in lines] == ["1/3", "2/3", "3/3", "3/3"]


def test_a_bar_on_a_terminal_and_nothing_below_min_items():
    out = Terminal()
    list(progress_bar(range(3), desc="gather", unit="job", file=out))
    assert out.getvalue().startswith("\rgather:") and "/3 [" in out.getvalue()  # redrawn in place
    quiet = io.StringIO()
    list(progress_bar(range(3), desc="gather", unit="job", min_items=10, file=quiet))
    assert quiet.getvalue() == ""
