"""The one place that draws tables: on the terminal (readable at 80 columns) and as Markdown.

A `Table` holds formatted cells. On a terminal it is drawn as a grid when every column fits
whole (a number or a name is never cut or folded; only multi-word headers wrap); when the
terminal is too narrow for that, each row becomes a block of `column: value` lines instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GRID_OVERHEAD = 3  # a grid column costs its cell plus "│ " and one space of padding


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str | None = None
    caption: str | None = None
    right: set[int] = field(default_factory=set)  # indices of right-aligned columns (numbers)

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])

    def min_width(self) -> int:
        """Columns each as wide as their widest cell or longest header word, plus the borders."""
        widths = [max([len(w) for w in col.split()] + [len(r[i]) for r in self.rows]) for i, col in enumerate(self.columns)]
        return sum(widths) + GRID_OVERHEAD * len(widths) + 1


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


def renderable(table: Table, width: int) -> Any:
    """A rich renderable: the grid when it fits `width`, else one block of lines per row."""
    from rich import box
    from rich.console import Group
    from rich.table import Table as RichTable
    from rich.text import Text

    if table.min_width() <= width:
        grid = RichTable(title=table.title, caption=table.caption, box=box.SIMPLE_HEAD, title_justify="left",
                         caption_justify="left")
        for i, col in enumerate(table.columns):
            cell_width = max([len(w) for w in col.split()] + [len(r[i]) for r in table.rows])
            grid.add_column(col, justify="right" if i in table.right else "left", min_width=cell_width, overflow="fold")
        for row in table.rows:
            grid.add_row(*row)
        return grid
    parts: list[Any] = [Text(table.title, style="bold")] if table.title else []
    label = max(len(c) for c in table.columns[1:]) if len(table.columns) > 1 else 0
    for row in table.rows:
        parts.append(Text(row[0], style="bold"))
        parts += [Text(f"  {col:<{label}}  {cell}") for col, cell in zip(table.columns[1:], row[1:])]
    if table.caption:
        parts.append(Text(table.caption, style="dim"))
    return Group(*parts)


def show(table: Table, console: Any = None) -> None:
    """Print a table as a result (on stdout, unless another console is given)."""
    from sc2quant.core.console import out

    console = console or out
    console.print(renderable(table, console.width), soft_wrap=False)
