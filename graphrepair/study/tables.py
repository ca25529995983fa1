"""Plain-text tables for the command line and the demo.

Plain text rather than rich tables: the output is pasted into issues and READMEs, read by tests,
and must look the same in a terminal, a pipe and a CI log (no width detection, no colour codes).
"""

from __future__ import annotations

from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, indent: str = "",
               right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; numbers (and ``right[i]``) right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    ncol = max(len(r) for r in cells)
    cells = [r + [""] * (ncol - len(r)) for r in cells]
    widths = [max(len(r[i]) for r in cells) for i in range(ncol)]
    if right is None:
        right = [i > 0 and all(_numeric(r[i]) for r in cells[1:] if r[i]) for i in range(ncol)]
    lines = []
    for k, row in enumerate(cells):
        parts = [c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(indent + "  ".join(parts).rstrip())
        if k == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    t = text.strip().rstrip("%").replace("e-", "").replace("e+", "").lstrip("+-")
    return t.replace(".", "", 1).isdigit() or t in ("-", "nan", "inf")


def wrapped_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, max_rows: int = 12,
                  indent: str = "") -> str:
    """Like :func:`text_table`, but a long list is laid out in side-by-side blocks of columns
    (at most 4 blocks) so that dozens of groups stay a compact table."""
    rows = list(rows)
    if len(rows) <= max_rows:
        return text_table(headers, rows, indent=indent)
    blocks = min(4, -(-len(rows) // max_rows))
    per = -(-len(rows) // blocks)
    chunks = [rows[i * per:(i + 1) * per] for i in range(blocks)]
    width = len(headers)
    merged = []
    for r in range(per):
        line: list[object] = []
        for b, chunk in enumerate(chunks):
            if b:
                line.append("|")
            line += list(chunk[r]) if r < len(chunk) else [""] * width
        merged.append(line)
    heads: list[str] = []
    for b in range(blocks):
        if b:
            heads.append("|")
        heads += list(headers)
    return text_table(heads, merged, indent=indent)


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``plural(1, "group")`` -> "1 group", ``plural(3, "group")`` -> "3 groups"."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"
