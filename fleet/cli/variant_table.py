"""`edge-fleet status DEVICE`: the device's variant choice as a table, after the status.

Reads the `model.selection` object of the device's status (docs/DESIGN.md "Variant
selection"); an agent before variants has none and nothing is printed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def selection_of(status: Any) -> dict[str, Any] | None:
    model = status.get("model") if isinstance(status, dict) else None
    selection = model.get("selection") if isinstance(model, dict) else None
    return selection if isinstance(selection, dict) else None


def print_selection(console: Console, status: Any) -> None:
    selection = selection_of(status)
    if selection is None:
        return
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    cached = " (cached choice)" if selection.get("cached") else ""
    # Every string here is the device's: escaped, so "[...]" in it is text, not markup.
    console.print(
        f"variant [bold]{escape(str(selection.get('chosen', '?')))}[/] on "
        f"{escape(str(selection.get('runtime', '?')))}{cached}: "
        f"{escape(str(selection.get('reason', '')))}",
        markup=True,
        highlight=False,
    )
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for name in ("variant", "status", "precision", "p50 ms", "peak MB", "why"):
        table.add_column(name, justify="right" if name.endswith(("ms", "MB")) else "left")
    variants = selection.get("variants")
    for v in variants if isinstance(variants, list) else []:
        if not isinstance(v, dict):
            continue
        why = str(v.get("reason") or "")
        if v.get("code") and v.get("status") == "failed":
            why = f"[{v['code']}] {why}"
        table.add_row(
            *(
                Text(cell)
                for cell in (
                    str(v.get("id", "?")),
                    str(v.get("status", "?")),
                    str(v.get("precision") or "-"),
                    _num(v.get("p50_ms"), ".4f"),
                    _num(v.get("peak_mb"), ".1f"),
                    why[:120],
                )
            )
        )
    console.print(table)
