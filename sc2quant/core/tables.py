"""The one place that draws tables: on the terminal (readable at 80 columns) and as Markdown.

A `Table` holds formatted cells. On a terminal it is drawn as a grid when it fits with every
word whole (a number or a name is never cut or folded; headers and multi-word cells wrap at
spaces); when the terminal is too narrow for that, each row becomes a block of
`column  value` lines instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str | None = None
    caption: str | None = None
    right: set[int] = field(default_factory=set)  # indices of right-aligned columns (numbers)

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for people: 3 significant digits, thousands separators, scientific when tiny."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and abs(value) < 10 ** -(digits - 1):
        return f"{value:.{digits - 1}e}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.{max(0, digits - len(str(int(abs(value)))))}f}"


def markdown(table: Table) -> list[str]:
    lines = [f"**{table.title}**", ""] if table.title else []
    lines += ["| " + " | ".join(table.columns) + " |",
              "|" + "|".join("---:" if i in table.right else "---" for i in range(len(table.columns))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", table.caption]
    return lines


def column_widths(table: Table, width: int) -> list[int] | None:
    """Widths that fit `width` with every word whole (narrowing the columns with the most
    wrappable text first), or None when even that does not fit."""
    texts = [[col, *(r[i] for r in table.rows)] for i, col in enumerate(table.columns)]
    natural = [max(len(t) for t in col) for col in texts]
    least = [max(len(w) for t in col for w in t.split() or [""]) for col in texts]
    budget = width - (3 * len(natural) - 1)  # a 3-character gap between cells, one space at each edge
    widths = natural[:]
    while sum(widths) > budget:
        slack = [w - m for w, m in zip(widths, least)]
        widest = max(range(len(widths)), key=lambda i: slack[i])
        if slack[widest] == 0:
            return None
        widths[widest] -= 1
    return widths


def renderable(table: Table, width: int) -> Any:
    """A rich renderable: the grid when it fits `width`, else one block of lines per row."""
    from rich import box
    from rich.console import Group
    from rich.table import Table as RichTable
    from rich.text import Text

    title = [Text(table.title, style="bold")] if table.title else []
    caption = [Text(table.caption, style="dim")] if table.caption else []
    widths = column_widths(table, width)
    if widths is not None:
        grid = RichTable(box=box.SIMPLE_HEAD, pad_edge=False)
        for i, (col, w) in enumerate(zip(table.columns, widths)):
            grid.add_column(col, justify="right" if i in table.right else "left", width=w, overflow="fold")
        for row in table.rows:
            grid.add_row(*row)
        return Group(*title, grid, *caption)
    label = max(len(c) for c in table.columns[1:]) if len(table.columns) > 1 else 0
    lines: list[Any] = []
    for row in table.rows:
        lines.append(Text(row[0], style="bold"))
        lines += [Text(f"  {col:<{label}}  {cell}") for col, cell in zip(table.columns[1:], row[1:])]
    return Group(*title, *lines, *caption)


def show(table: Table, console: Any = None) -> None:
    """Print a table as a result (on stdout, unless another console is given)."""
    from sc2quant.core.console import out

    console = console or out
    console.print(renderable(table, console.width), soft_wrap=False)
