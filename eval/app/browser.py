"""The app as a subprocess and a headless Chromium driving its page, for the tests and `screenshot`.

`app_server(flags)` starts `python -m eval.app --port 0 ...` on 127.0.0.1, waits for its `Running on URL` line and
for the URL to answer (never a fixed sleep), and stops that process (and only it) on exit. `headless_chromium()` is
the system browser and driver (`/usr/bin/chromium`, `/usr/bin/chromedriver`; selenium-manager never runs, nothing is
downloaded). The page's fields are found by their `elem_id` (eval/app/page.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"Running on (http://\S+)")


def browser_problem() -> str | None:
    """Why the page cannot be driven here (missing selenium, browser or driver), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        return f"no system Chromium / chromedriver ({', '.join(missing)} missing; apt-get install chromium-driver)"
    return None


@dataclass
class Server:
    """A running app: its URL and everything it printed so far."""

    process: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)


def _read(server: Server, ready: threading.Event) -> None:
    for line in server.process.stdout:
        server.lines.append(line)
        found = URL_LINE.search(line)
        if found and not server.url:
            server.url = found.group(1).rstrip("/") + "/"
            ready.set()
    ready.set()  # the process ended


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def app_server(flags: list[str], timeout: float = 300.0) -> Iterator[Server]:
    """`python -m eval.app --port 0 *flags` until the block ends; a RuntimeError with its output if it does not
    come up within `timeout` seconds."""
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    command = [sys.executable, "-m", "eval.app", "--port", "0", *flags]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server, ready = Server(process), threading.Event()
    threading.Thread(target=_read, args=(server, ready), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        ready.wait(timeout)
        while not (server.url and _answers(server.url)):
            if process.poll() is not None or time.monotonic() > deadline:
                last = server.lines[-1].strip() if server.lines else "no output"
                raise RuntimeError(
                    f"the app did not come up (exit {process.poll()}): {last}\n{server.output()[-4000:]}"
                )
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1000):
    """A selenium driver of the system's headless Chromium, quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The app's page in a driver: fill the fields, press Generate, wait for the status line and the gallery."""

    def __init__(self, driver, url: str, timeout: float = 180.0):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.timeout = driver, timeout
        driver.get(url)
        WebDriverWait(driver, timeout).until(lambda d: d.find_elements("css selector", "#generate"))

    def find(self, css: str):
        return self.driver.find_element("css selector", css)

    def type_into(self, elem_id: str, text: str) -> None:
        """Replaces the text of the field `elem_id` (a text box or number field)."""
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} textarea, #{elem_id} input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)

    def status(self) -> str:
        return self.find("#status").text

    def generate(self, expect: str) -> str:
        """Presses Generate and waits until the status line contains `expect` (which the line before must not: each
        wait is for this request's answer); the status line."""
        from selenium.webdriver.support.ui import WebDriverWait

        before = self.status()
        if expect in before:
            raise ValueError(f"the status line already says {expect!r}; wait for something this request changes")
        self.find("#generate").click()
        WebDriverWait(self.driver, self.timeout).until(lambda d: expect in self.status())
        return self.status()

    def gallery_sizes(self, count: int) -> list[tuple[int, int]]:
        """(width, height) of the gallery's images, once `count` of them have loaded."""
        from selenium.webdriver.support.ui import WebDriverWait

        script = (
            "return [...document.querySelectorAll('#gallery img')]"
            ".filter(i => i.complete && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight]);"
        )
        WebDriverWait(self.driver, self.timeout).until(lambda d: len(d.execute_script(script)) >= count)
        return [tuple(s) for s in self.driver.execute_script(script)]
