"""Writes a benchmark's table between its markers in README.md (`<!-- bench:NAME -->`)."""
from __future__ import annotations

import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def write_section(name: str, table: str) -> None:
    "Replaces what README.md holds between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` with the table."
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers to write the table between.")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    README.write_text(f"{head}{start}\nMeasured {time.strftime('%Y-%m-%d')} (2 cores), `make bench`:\n\n"
                      f"{table}\n{end}{tail}")
