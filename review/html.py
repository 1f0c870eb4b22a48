"""Self-contained HTML documents: every figure an embedded PNG, styles inline, no scripts, no
external URLs, so a report opens offline and can be archived as one file.

    doc = Document("kapok-microloan v3", subtitle="...")
    with doc.section("Performance", "模型表现"):
        doc.paragraph("...")
        doc.table(frame)
        doc.figure(fig, "ROC on the test window")
    html = doc.render()
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl
from matplotlib.figure import Figure

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","Microsoft YaHei",
sans-serif;margin:2em auto;max-width:1100px;color:#1b1b1b;line-height:1.45;padding:0 1em}
h1{border-bottom:3px solid #2f6b4f;padding-bottom:.3em}
h2{margin-top:2em;border-bottom:1px solid #bbb;color:#2f6b4f}
h2 .zh,h3 .zh{color:#666;font-weight:normal;margin-left:.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#eef4f0}td.text,th.text{text-align:left}
figure{margin:1em 0;display:inline-block;vertical-align:top}
figcaption{font-size:.85em;color:#555;max-width:640px}
img{max-width:100%;border:1px solid #eee}
.flag{color:#a40000;font-weight:bold}.ok{color:#2f6b4f}.watch{color:#b36b00;font-weight:bold}
.note{background:#f7f7f2;border-left:4px solid #c9b458;padding:.5em 1em}
.signoff td{height:2.2em;min-width:14em;text-align:left}
nav ol{columns:2}
"""


def figure_png(fig: Figure, dpi: int = 96) -> str:
    """A matplotlib figure as a data: URI (PNG); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(value: Any, digits: int) -> tuple[str, bool]:
    if value is None:
        return "–", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), True
    if isinstance(value, float):
        if value != value:  # NaN
            return "–", False
        if abs(value) >= 1e5:
            return f"{value:,.0f}", False
        return f"{value:.{digits}f}", False
    if isinstance(value, int):
        return f"{value:,}", False
    return str(value), True


class Document:
    def __init__(self, title: str, subtitle: str = "", lang: str = "en") -> None:
        self.title, self.subtitle, self.lang = title, subtitle, lang
        self._parts: list[str] = []
        self._toc: list[tuple[str, str, str]] = []

    # -- structure -------------------------------------------------------------------------------
    @contextmanager
    def section(self, en: str, zh: str = "") -> Iterator[None]:
        anchor = f"s{len(self._toc) + 1}"
        self._toc.append((anchor, en, zh))
        zh_part = f'<span class="zh">{html.escape(zh)}</span>' if zh else ""
        self._parts.append(f'<section id="{anchor}"><h2>{html.escape(en)}{zh_part}</h2>')
        try:
            yield
        finally:
            self._parts.append("</section>")

    def heading(self, en: str, zh: str = "") -> None:
        zh_part = f'<span class="zh">{html.escape(zh)}</span>' if zh else ""
        self._parts.append(f"<h3>{html.escape(en)}{zh_part}</h3>")

    # -- content ---------------------------------------------------------------------------------
    def paragraph(self, text: str, css: str = "") -> None:
        cls = f' class="{css}"' if css else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def bullets(self, items: Sequence[str], css: str = "") -> None:
        cls = f' class="{css}"' if css else ""
        lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
        self._parts.append(f"<ul{cls}>{lis}</ul>")

    def flag(self, text: str) -> None:
        self.paragraph("⚑ " + text, "flag")

    def note(self, text: str) -> None:
        self.paragraph(text, "note")

    def raw(self, markup: str) -> None:
        """Trusted markup built by Kapok itself (never user input)."""
        self._parts.append(markup)

    def table(
        self,
        rows: pl.DataFrame | Sequence[dict[str, Any]],
        digits: int = 4,
        css: str = "",
        highlight: str | None = None,
    ) -> None:
        """A table from a polars frame or dict rows; `highlight` names a bool column whose true
        rows are shown as flags (the column itself is shown as yes/no)."""
        frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows))
        cls = f' class="{css}"' if css else ""
        head = "".join(f'<th class="text">{html.escape(c)}</th>' for c in frame.columns)
        body = []
        for row in frame.iter_rows(named=True):
            flagged = bool(highlight and row.get(highlight))
            cells = []
            for value in row.values():
                text, is_text = _cell(value, digits)
                cells.append(f'<td class="text">{html.escape(text)}</td>' if is_text
                             else f"<td>{html.escape(text)}</td>")  # fmt: skip
            tr = ' class="flag"' if flagged else ""
            body.append(f"<tr{tr}>{''.join(cells)}</tr>")
        self._parts.append(f"<table{cls}><tr>{head}</tr>{''.join(body)}</table>")

    def key_values(self, pairs: Sequence[tuple[str, Any]], digits: int = 4) -> None:
        self.table([{"item": k, "value": _cell(v, digits)[0]} for k, v in pairs])

    def figure(self, fig: Figure, caption: str, name: str = "") -> None:
        """Embed a matplotlib figure; `name` becomes the img's data-figure attribute."""
        uri = figure_png(fig)
        attr = f' data-figure="{html.escape(name)}"' if name else ""
        self._parts.append(
            f'<figure><img{attr} alt="{html.escape(caption)}" src="{uri}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    # -- output ----------------------------------------------------------------------------------
    def render(self) -> str:
        toc = "".join(
            f'<li><a href="#{a}">{html.escape(en)}{" · " + html.escape(zh) if zh else ""}</a></li>'
            for a, en, zh in self._toc
        )
        generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return (
            f'<!DOCTYPE html><html lang="{self.lang}"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>"
            f"<p>{html.escape(self.subtitle)}</p><p><small>generated {generated} by Kapok"
            f"</small></p><nav><ol>{toc}</ol></nav>{''.join(self._parts)}</body></html>"
        )
