"""What every benchmark prints and writes: a plain-text table, and a JSON report with its command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], left_columns: int = 1) -> None:
    """Columns fit their widest cell; the first ``left_columns`` are left-aligned, numbers right-aligned."""
    rows = [list(row) + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return " ".join(str(c).ljust(w) if i < left_columns else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(f"\n{title}")
    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row).rstrip())


def write_report(path: Path, benchmark: str, argv: Sequence[str] | None, **fields) -> None:
    """``path`` <- {"benchmark", **fields, "command"}: the command that reproduces it."""
    args = list(sys.argv[1:] if argv is None else argv)
    report = {"benchmark": benchmark, **fields, "command": " ".join(["python", f"benchmarks/{benchmark}.py", *args])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
