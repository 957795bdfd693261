"""The self-contained report page: inline CSS, figures as base64 PNG data URIs.

The page loads nothing: no script, no stylesheet, no font and no image from
outside the file, so it opens offline and can be mailed as one file. Every text
taken from the run directory passes through `html.escape`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape

import pandas as pd

import upcycle

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #1a1a1a; line-height: 1.5; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; }
p.summary { font-size: 1.05rem; background: #f3f6fa; padding: 0.8rem 1rem;
            border-left: 4px solid #3b6ea8; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.92rem; color: #333; }
table { border-collapse: collapse; font-size: 0.88rem; margin-top: 0.8rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
nav ul { columns: 2; }
"""


@dataclass
class PageFigure:
    """A rendered figure: PNG bytes with their pixel size, title, caption and an optional table.

    `table` contains display strings, one column per header, and is shown under the figure.
    """

    name: str
    title: str
    caption: str
    png: bytes
    width: int
    height: int
    table: pd.DataFrame | None = None


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_table(table: pd.DataFrame) -> str:
    """Render a table of display strings. Cells that parse as numbers are right-aligned."""
    header = "".join(f"<th>{escape(str(column))}</th>" for column in table.columns)
    rows = []
    for record in table.itertuples(index=False):
        cells = []
        for value in record:
            text = str(value)
            numeric = pd.notna(pd.to_numeric(text, errors="coerce"))
            css = ' class="number"' if numeric else ""
            cells.append(f"<td{css}>{escape(text)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


def render_figure(figure: PageFigure) -> str:
    anchor = escape(figure.name, quote=True)
    parts = [
        f'<section id="{anchor}">',
        f"<h2>{escape(figure.title)}</h2>",
        "<figure>",
        f'<img src="{png_data_uri(figure.png)}" alt="{escape(figure.title, quote=True)}" '
        f'width="{figure.width}" height="{figure.height}">',
        f"<figcaption>{escape(figure.caption)} Files: "
        f'<a href="{anchor}.png">{anchor}.png</a>, <a href="{anchor}.svg">{anchor}.svg</a>.'
        "</figcaption>",
        "</figure>",
    ]
    if figure.table is not None and not figure.table.empty:
        parts.append(render_table(figure.table))
    parts.append("</section>")
    return "\n".join(parts)


def render_page(
    *,
    title: str,
    summary: str,
    config_text: str | None,
    figures: list[PageFigure],
    skipped: list[tuple[str, str]],
) -> str:
    """Return the whole report page as HTML text.

    `config_text` is the resolved config as YAML, or None when the run has no
    config.yaml. `skipped` lists (figure name, reason) for figures not drawn.
    """
    contents = "\n".join(
        f'<li><a href="#{escape(figure.name, quote=True)}">{escape(figure.title)}</a></li>'
        for figure in figures
    )
    contents += '\n<li><a href="#config">Resolved config</a></li>'
    if config_text is None:
        config_html = "<p>This run directory has no config.yaml.</p>"
    else:
        config_html = f"<pre>{escape(config_text)}</pre>"
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # An empty data URI stops browsers from requesting /favicon.ico next to the file.
        '<link rel="icon" href="data:,">',
        f"<title>{escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="summary">{escape(summary)}</p>',
        f"<nav><ul>\n{contents}\n</ul></nav>",
        *(render_figure(figure) for figure in figures),
    ]
    if skipped:
        items = "\n".join(f"<li>{escape(name)}: {escape(reason)}</li>" for name, reason in skipped)
        sections += [
            "<h2>Figures not drawn</h2>",
            "<p>These figures need result files that this run does not have yet.</p>",
            f"<ul>\n{items}\n</ul>",
        ]
    # The config comes last and folded, because a real run's config is a few hundred lines.
    sections += [
        '<h2 id="config">Resolved config</h2>',
        f"<details><summary>config.yaml of the run</summary>\n{config_html}\n</details>"
        if config_text is not None
        else config_html,
        f"<footer><p>Written by upcycle {escape(upcycle.__version__)}.</p></footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(section for section in sections if section) + "\n"
