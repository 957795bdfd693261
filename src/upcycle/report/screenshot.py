"""Full-page screenshots of a report page in headless Chromium, through Selenium.

This needs the `selenium` Python package and the Debian packages `chromium`
and `chromium-driver` (/usr/bin/chromium and /usr/bin/chromedriver). Selenium
is given both paths, so Selenium Manager never runs and nothing is downloaded.
Chromium starts with networking features off and a fresh profile in a
temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.errors import UpcycleError
from upcycle.io import atomic_write_bytes

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

logger = logging.getLogger(__name__)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
INSTALL_HINT = (
    "install the Debian packages chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver)"
)


def find_chromium() -> tuple[str, str]:
    """Return the paths of the Chromium browser and of chromedriver.

    Raises:
        UpcycleError: if either is not on PATH. The message names the packages to install.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    if missing or browser is None or driver is None:
        raise UpcycleError(f"{' and '.join(missing)} not found on PATH: {INSTALL_HINT}")
    return browser, driver


@contextmanager
def chromium_driver(*, width: int = 1200, height: int = 2400) -> Iterator[WebDriver]:
    """Start headless Chromium with a `width` x `height` CSS-pixel window and quit it on exit.

    The window includes decorations, so the page's viewport is somewhat shorter.

    Browser console messages are kept, so `driver.get_log("browser")` returns them.

    Raises:
        UpcycleError: if selenium, Chromium or chromedriver is missing, or Chromium
            fails to start.
    """
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        raise UpcycleError(
            f"screenshots need the selenium package ({error}): pip install selenium"
        ) from error
    browser, driver_path = find_chromium()
    with tempfile.TemporaryDirectory(prefix="upcycle-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        except WebDriverException as error:
            raise UpcycleError(
                f"Chromium ({browser}) failed to start through {driver_path}: {error.msg}. "
                f"Check that both come from the same release, or reinstall them: {INSTALL_HINT}"
            ) from error
        try:
            yield driver
        finally:
            driver.quit()


def screenshot(
    html_path: str | Path, png_path: str | Path, *, width: int = 1200, height: int = 2400
) -> Path:
    """Save a screenshot of the whole page at `html_path` as a PNG and return its path.

    The viewport is `width` CSS pixels wide and at least `height` tall. It grows
    to the page's full height, so a longer page is captured whole.

    Raises:
        UpcycleError: if `html_path` is not a file or Chromium cannot run.
    """
    html_path = Path(html_path).resolve()
    png_path = Path(png_path)
    if not html_path.is_file():
        raise UpcycleError(f"page not found: {html_path}. Write the report before its screenshot.")
    with chromium_driver(width=width, height=height) as driver:
        driver.get(html_path.as_uri())
        # Headless Chromium still reserves window decorations, so the viewport is
        # smaller than the window. The screenshot shows only the viewport.
        extra_width, extra_height, page_height = driver.execute_script(
            "return [window.outerWidth - window.innerWidth,"
            " window.outerHeight - window.innerHeight,"
            " Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)];"
        )
        driver.set_window_size(width + extra_width, max(height, page_height) + extra_height)
        png = driver.get_screenshot_as_png()
    atomic_write_bytes(png_path, png)
    logger.info("wrote screenshot of %s to %s", html_path, png_path)
    return png_path
