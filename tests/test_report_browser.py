"""Open the report of a tiny synthetic run in headless Chromium through Selenium.

Needs the Debian packages chromium and chromium-driver and the selenium Python
package. Without them the tests fail with a message that names the packages:
they are never skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from upcycle.errors import UpcycleError
from upcycle.report import write_report
from upcycle.report.screenshot import chromium_driver, find_chromium, screenshot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (0, 10, 100)
# Mean test accuracy per task at each step, for the experts and for each merging method.
EXPERTS = {"alpha": (0.50, 0.70, 0.80), "beta": (0.40, 0.60, 0.70)}
MERGES = {"task_arithmetic": (0.45, 0.62, 0.60), "ties": (0.45, 0.60, 0.63)}
# expert_accuracy, merged_accuracy, merged_normalized_accuracy, best_method_per_task, selection
FIGURE_COUNT = 5


def write_tiny_run(root: Path) -> Path:
    """Write a run with experts.csv, merges.csv and selection.csv for 2 tasks and 1 seed."""
    results = root / "results"
    results.mkdir(parents=True)
    (root / "config.yaml").write_text("name: browser-check\nseeds: [0]\n", encoding="utf-8")
    experts, merges, selection = [], [], []
    for task, values in EXPERTS.items():
        for step, accuracy in zip(STEPS, values, strict=True):
            experts.append(
                {
                    "seed": 0,
                    "task": task,
                    "step": step,
                    "split": "test",
                    "accuracy": accuracy,
                    "n": 20,
                }
            )
            for method, merged in MERGES.items():
                value = merged[STEPS.index(step)]
                merges.append(
                    {
                        "seed": 0,
                        "method": method,
                        "step": step,
                        "coefficient": 1.0,
                        "task": task,
                        "split": "test",
                        "accuracy": value,
                        "expert_accuracy": accuracy,
                        "normalized_accuracy": value / accuracy,
                    }
                )
    for method, merged in MERGES.items():
        for strategy, index, compute in (("final", 2, 1.0), ("patience", 1, 0.1)):
            selection.append(
                {
                    "seed": 0,
                    "kind": "full",
                    "method": method,
                    "strategy": strategy,
                    "steps": f"alpha:{STEPS[index]};beta:{STEPS[index]}",
                    "compute_fraction": compute,
                    "validation_accuracy": None,
                    "test_accuracy": merged[index],
                    "merges_evaluated": 1,
                }
            )
    pd.DataFrame(experts).to_csv(results / "experts.csv", index=False)
    pd.DataFrame(merges).to_csv(results / "merges.csv", index=False)
    pd.DataFrame(selection).to_csv(results / "selection.csv", index=False)
    return root


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        find_chromium()
    except UpcycleError as error:
        pytest.fail(str(error))
    return write_report(write_tiny_run(tmp_path_factory.mktemp("browser") / "run"))


@pytest.fixture(scope="module")
def loaded_driver(report_page: Path) -> Iterator:
    """Chromium with the report page loaded."""
    with chromium_driver(width=1200, height=900) as driver:
        driver.get(report_page.resolve().as_uri())
        yield driver


def test_browser_image_count(loaded_driver) -> None:
    assert loaded_driver.execute_script("return document.images.length;") == FIGURE_COUNT


def test_browser_images_complete(loaded_driver) -> None:
    states = loaded_driver.execute_script(
        "return Array.from(document.images, image => [image.complete, image.naturalWidth]);"
    )
    for index, (complete, natural_width) in enumerate(states):
        assert complete, f"image {index} did not finish loading"
        assert natural_width > 0, f"image {index} has no pixels"


def test_browser_image_width(loaded_driver) -> None:
    widths = loaded_driver.execute_script(
        "return Array.from(document.images, image => image.naturalWidth);"
    )
    assert widths == [800] * FIGURE_COUNT


def test_browser_no_severe_log(loaded_driver) -> None:
    severe = [entry for entry in loaded_driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []


def test_browser_fetches_nothing(loaded_driver) -> None:
    fetched = loaded_driver.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name);"
    )
    assert fetched == []


def test_browser_table_rows(loaded_driver) -> None:
    rows = loaded_driver.execute_script("return document.querySelectorAll('tbody tr').length;")
    assert rows == 4


def test_browser_screenshot(loaded_driver, tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    assert loaded_driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_screenshot_full_page(report_page: Path, tmp_path: Path) -> None:
    path = screenshot(report_page, tmp_path / "docs.png", width=1000, height=600)
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == PNG_MAGIC
    assert width == 1000
    # Five 450-pixel figures alone are taller than the 600-pixel minimum.
    assert height > 5 * 450


def test_screenshot_missing_page(tmp_path: Path) -> None:
    with pytest.raises(UpcycleError, match="page not found"):
        screenshot(tmp_path / "absent.html", tmp_path / "out.png")
