"""A real console stack for the browser tests and bench/bench_console.py: `feedloop serve` with
API keys (two raters and an admin) over a registry holding two versions, `feedloop console` in
front of it, and headless Chromium (Debian's chromium and chromium-driver) driven by selenium.
Every process is started on free loopback ports and stopped on exit.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server_harness import ServeProcess, start_serve

from feedloop.core.registry import DirectoryRegistry

KEYS = {
    "ann": ("sk-ann-4f2a9c7e1b3d5608", ["generate", "feedback"]),
    "bob": ("sk-bob-8e1d3c5a7f9b2046", ["generate", "feedback"]),
    "console-admin": ("sk-adm-6b0e2f4a8c1d3957", ["admin"]),
}
CONSOLE_BANNER_RE = re.compile(r"^feedloop console: listening (?P<url>http://\S+) ")
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromedriver")


def browser_available() -> str | None:
    """None when the browser tests can run; else why not (they are skipped, saying so)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    if not all(Path(p).exists() for p in CHROMIUM):
        return "Debian's chromium and chromium-driver are not installed"
    return None


def start_browser(width: int = 1100, height: int = 760) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMIUM[1]))


@dataclass
class ConsoleStack:
    url: str
    store_path: Path
    server: ServeProcess
    console: subprocess.Popen[str]


def _keys_file(path: Path) -> Path:
    entries = [
        f'[[keys]]\nname = "{name}"\nkey = "{key}"\nroles = {roles!r}\n'.replace("'", '"')
        for name, (key, roles) in KEYS.items()
    ]
    path.write_text("\n".join(entries))
    return path


@contextlib.contextmanager
def console_stack(
    root: Path, live: Path, candidate: Path, *serve_extra: str
) -> Iterator[ConsoleStack]:
    """v0001 (from `live`) live and v0002 (from `candidate`) published; server and console up."""
    registry = DirectoryRegistry(root / "registry")
    registry.publish(live, reason="live", make_live=True)
    registry.publish(candidate, reason="to evaluate")
    registry.close()
    store_path = root / "replay.sqlite3"
    server = start_serve(
        [
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--data-dir",
            str(root),
            "--registry",
            str(root / "registry"),
            "--store",
            str(store_path),
            "--auth-keys-file",
            str(_keys_file(root / "keys.toml")),
            "--max-queue-delay-ms",
            "1",
            *serve_extra,
        ]
    )
    feedloop = shutil.which("feedloop", path=str(Path(sys.executable).parent)) or "feedloop"
    console = subprocess.Popen(
        [
            feedloop,
            "console",
            "--target",
            server.grpc_address,
            "--port",
            "0",
            "--admin-key",
            KEYS["console-admin"][0],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert console.stdout is not None
        line = console.stdout.readline().strip()
        match = CONSOLE_BANNER_RE.match(line)
        if not match:
            console.kill()
            raise AssertionError(f"no banner from feedloop console: {line!r}\n{console.stderr}")
        yield ConsoleStack(match["url"], store_path, server, console)
    finally:
        console.terminate()
        try:
            console.wait(timeout=10)
        except subprocess.TimeoutExpired:
            console.kill()
            console.wait(timeout=10)
        server.terminate()


class Rater:
    """One person at the console, as a browser sees it."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def after(self, action: Any, timeout_s: float = 20.0) -> None:
        """Do action (a click, a key) and wait until the page it causes has loaded.

        The current document is marked first; the wait ends at a loaded document without the
        mark. (selenium's staleness_of asks chromedriver about the old element, which during
        the navigation can fail with "unhandled inspector error" instead of reporting it
        stale.) Errors while the browser is between documents are waited out."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.execute_script("document.documentElement.dataset.left = '1'")
        action()
        # Poll every 5 ms (selenium's default is 500 ms): the bench times these waits.
        WebDriverWait(
            self.driver, timeout_s, poll_frequency=0.005, ignored_exceptions=[WebDriverException]
        ).until(
            lambda d: d.execute_script(
                "return document.readyState === 'complete' && "
                "document.documentElement.dataset.left === undefined"
            )
        )

    def sign_in(self, name: str) -> None:
        self.driver.get(self.url + "/")
        if self.finds("#rater"):  # someone signed in on this browser before: sign them out
            self.after(lambda: self.find("header form.who button").click())
        self.find("#name").send_keys(name)
        self.find("#key").send_keys(KEYS[name][0])
        self.after(lambda: self.find("#login").click())

    def open(self, mode: str) -> None:
        self.driver.get(f"{self.url}/{mode}")

    def ask(self, prompt: str) -> None:
        field = self.find("#prompt")
        field.clear()
        field.send_keys(prompt)
        self.after(lambda: self.find("#ask").click())

    def notice(self) -> tuple[str, str, str, str]:
        """(class: ack or error, text, acknowledged event id, outcome)."""
        n = self.find("#notice")
        return (
            n.get_attribute("class") or "",
            n.text,
            n.get_attribute("data-event-id") or "",
            n.get_attribute("data-outcome") or "",
        )

    def press(self, *keys: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(*keys).perform()

    def keys(self, *keys: str) -> None:
        """Press keys and wait for the page they cause."""
        self.after(lambda: self.press(*keys))

    def screenshot(self, folder: Path | None, name: str) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(folder / f"{name}.png"))
