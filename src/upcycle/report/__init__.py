"""The run report: figures as PNG and SVG files and one self-contained HTML page.

`write_report(run)` reads only `RUN/config.yaml` and `RUN/results/*.csv` and
writes `RUN/report/index.html` with every figure embedded, plus
`RUN/report/<figure>.png` and `.svg`. A figure whose result file is missing or
empty is skipped and listed at the end of the page. A run directory without any
result rows raises `ReportError` instead of producing an empty page.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib
import yaml
from matplotlib.figure import Figure

from upcycle.io import atomic_write_bytes, atomic_write_text
from upcycle.report.figures import (
    MissingData,
    ReportError,
    ReportFigure,
    RunResults,
    figure_specs,
    load_results,
)
from upcycle.report.html import PageFigure, render_page
from upcycle.report.summary import summarize, summary_paragraph

__all__ = ["ReportError", "figure_names", "summary_paragraph", "write_report"]

logger = logging.getLogger(__name__)

DPI = 100


def figure_names() -> list[str]:
    """Return the file names (without extension) of every figure the report can draw."""
    return [spec.name for spec in figure_specs()]


def render_figure_files(figure: Figure) -> tuple[bytes, bytes]:
    """Render a figure as PNG (at 100 dpi) and SVG bytes without timestamps, so reruns match."""
    png = io.BytesIO()
    svg = io.BytesIO()
    # A fixed hash salt makes the SVG element ids the same on every run.
    with matplotlib.rc_context({"svg.hashsalt": "upcycle-report"}):
        figure.savefig(png, format="png", dpi=DPI)
        figure.savefig(svg, format="svg", metadata={"Date": None})
    return png.getvalue(), svg.getvalue()


def read_config(run_dir: Path) -> tuple[str | None, str]:
    """Return the config as pretty-printed YAML (None when absent) and the run's name.

    A config.yaml that is not valid YAML is shown as it is, because the report
    should still render for a run whose config was edited by hand.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        logger.info("no config.yaml in %s, so the report shows no config", run_dir)
        return None, run_dir.name
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        logger.warning("config %s is not valid YAML, shown unparsed: %s", path, error)
        return text, run_dir.name
    if not isinstance(config, dict):
        return text, run_dir.name
    name = config.get("name")
    pretty = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return pretty, str(name) if name else run_dir.name


def write_figure(report_dir: Path, name: str, drawn: ReportFigure) -> PageFigure:
    """Write `name`.png and `name`.svg into `report_dir` and return the figure for the page."""
    png, svg = render_figure_files(drawn.figure)
    atomic_write_bytes(report_dir / f"{name}.png", png)
    atomic_write_bytes(report_dir / f"{name}.svg", svg)
    width, height = (round(size * DPI) for size in drawn.figure.get_size_inches())
    return PageFigure(
        name=name,
        title=drawn.title,
        caption=drawn.caption,
        png=png,
        width=width,
        height=height,
        table=drawn.table,
    )


def remove_stale_figure(report_dir: Path, name: str) -> None:
    """Delete the files of a figure drawn by an earlier report but skipped now."""
    for path in (report_dir / f"{name}.png", report_dir / f"{name}.svg"):
        if path.is_file():
            path.unlink()
            logger.info("removed stale figure file %s", path)


def draw_figures(
    results: RunResults, report_dir: Path
) -> tuple[list[PageFigure], list[tuple[str, str]]]:
    """Build and write every figure the results support.

    Returns the drawn figures and a (name, reason) pair for each skipped one.
    """
    drawn_figures: list[PageFigure] = []
    skipped: list[tuple[str, str]] = []
    for spec in figure_specs():
        try:
            drawn = spec.build(results)
        except MissingData as reason:
            logger.info("skipped figure %s: %s", spec.name, reason)
            skipped.append((spec.name, str(reason)))
            remove_stale_figure(report_dir, spec.name)
            continue
        drawn_figures.append(write_figure(report_dir, spec.name, drawn))
        logger.info("wrote figure %s to %s", spec.name, report_dir)
    return drawn_figures, skipped


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report/index.html and the figure files, and return the path of index.html.

    Raises:
        ReportError: if `run_dir` is not a directory, has no result rows, or a result
            file is invalid.
        UpcycleError: if a report file cannot be written.
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    report_dir = run_dir / "report"
    config_text, name = read_config(run_dir)
    figures, skipped = draw_figures(results, report_dir)
    page = render_page(
        title=f"upcycle report: {name}",
        summary=summarize(results),
        config_text=config_text,
        figures=figures,
        skipped=skipped,
    )
    index = report_dir / "index.html"
    atomic_write_text(index, page)
    logger.info("wrote report %s with %d figures, %d skipped", index, len(figures), len(skipped))
    return index
