"""llama.cpp's web UI and llamad's dashboard in a real browser: Debian's chromium, headless,
driven through chromedriver by selenium from the host, against llamad in the box (which
shares the host's network).

Screenshots are saved in test-artifacts/browser/ (git-ignored); the run prints where.
Every request the browser makes is recorded: none may leave the machine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import rig
from helpers.daemon import Factory, models

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# A small llama-server answer (-n: most tokens per reply), so a chat ends in seconds even
# on a busy machine.
SETTINGS = {"ui-dir": str(rig.WEB_UI), "args": "-c 4096 -np 4 -t 1 -n 24"}
TIMEOUT = 180  # seconds for one page state; a busy 2-core machine generates ~1 token/s


@pytest.fixture(scope="module")
def screenshots(pytestconfig: pytest.Config) -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nbrowser screenshots: {ARTIFACTS}")
    return ARTIFACTS


@pytest.fixture
def browser(screenshots: Path) -> Iterator[Any]:
    for path in (CHROMIUM, DRIVER):
        if not path.exists():
            pytest.fail(f"{path} is missing: run `make dev` (apt: chromium chromium-driver)")
    # Imported here: the rest of the suite runs without selenium.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: Any, what: str, probe: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Wait for `probe` to return something truthy, as the page changes under it."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # A click lands on something else while a list still slides open (the UI's model
    # picker, under load): tried again, as a person would once it stops moving.
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(
        StaleElementReferenceException, NoSuchElementException,
        ElementClickInterceptedException))
    try:
        return wait.until(lambda _: probe())
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / "timeout.png"))
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} "
                           f"(page: {ARTIFACTS / 'timeout.png'})") from None


def click(driver: Any, css: str, text: str | tuple[str, ...]) -> None:
    """Click the first shown element matching `css` whose text starts with `text`."""
    def find() -> bool:
        for element in driver.find_elements("css selector", css):
            if element.is_displayed() and element.text.strip().startswith(text):
                element.click()
                return True
        return False
    until(driver, f"{css} {text!r} to click", find)


def requests_made(driver: Any) -> list[str]:
    """URLs the browser requested since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def leaving_the_machine(urls: list[str]) -> list[str]:
    return [u for u in urls if urlsplit(u).scheme not in ("data", "blob")
            and urlsplit(u).hostname != "127.0.0.1"]


def row(driver: Any, model: str) -> Any:
    return driver.find_element("css selector", f"#models tr[data-model='{model}']")


def test_chat_in_llamacpp_ui(llamad_factory: Factory, browser: Any) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], **SETTINGS)
    browser.get(d.url + "/")
    # The model selector shows the first model; choose gemma-b from its list.
    click(browser, "button", ("gemma-a", "gemma-b"))
    click(browser, "[role=option]", "gemma-b")
    box = until(browser, "the message box", lambda: browser.find_element("css selector",
                                                                         "textarea"))
    box.send_keys("What is the capital of France?\n")
    answer = until(browser, "an answer to appear", lambda: browser.find_element(
        "css selector", "[aria-label='Assistant message with actions'] .markdown-content"
    ).text.strip())
    assert answer
    unit = "llama-server@gemma-b.service"
    rig.wait_for(f"{unit} active", lambda: d.show(unit, "ActiveState") == "active")
    assert "llama-server@gemma-a.service" not in d.model_units()
    rig.wait_for("the answer to end", lambda: models(d.url)["gemma-b"]["llamad"]["in_flight"]
                 == 0, timeout=TIMEOUT)
    browser.save_screenshot(str(ARTIFACTS / "chat.png"))
    assert models(d.url)["gemma-b"]["llamad"]["served"] >= 1
    # Gemma's GGUF has no chat template: llamad gives it Gemma's, not ChatML's tags.
    answer = browser.find_element("css selector", "[aria-label='Assistant message with "
                                  "actions'] .markdown-content").text
    assert "<|im_start|>" not in answer and "<|im_end|>" not in answer, answer
    # llamad adds one link to the UI's page: its dashboard.
    click(browser, "#llamad-dashboard", "Dashboard")
    until(browser, "the dashboard to show gemma-b ready",
          lambda: row(browser, "gemma-b").get_attribute("data-state") == "ready")
    assert not leaving_the_machine(requests_made(browser))
    # Both pages ran under their Content-Security-Policy without it blocking anything.
    assert not policy_violations(browser)


def policy_violations(driver: Any) -> list[str]:
    """What the browser's console said about its Content-Security-Policy blocking things."""
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"]]


def test_the_dashboard_keeps_its_key_in_the_tab(llamad_factory: Factory, browser: Any,
                                                box: rig.Box) -> None:
    """security-review-3 L7: the dashboard kept the admin key in localStorage, where any
    script on llamad's origin (the chat UI renders model output) could read it later."""
    keys = box.workdir / "browser-keys"
    keys.write_text("boss-key admin\n")
    keys.chmod(0o600)
    d = llamad_factory(["gemma-a"], **{**SETTINGS, "api-keys-file": str(keys)})
    browser.get(d.url + "/dashboard")
    key = until(browser, "the key form", lambda: browser.find_element("css selector", "#key"))
    until(browser, "the key form to show", lambda: key.is_displayed())
    key.send_keys("boss-key\n")
    until(browser, "the live feed with the key", lambda: row(browser, "gemma-a"))
    stored = browser.execute_script(
        "return [localStorage.getItem('llamad.api-key'), "
        "sessionStorage.getItem('llamad.api-key')]")
    assert stored == [None, "boss-key"]
    assert not policy_violations(browser)


def _ram_shown(driver: Any, model: str) -> str:
    text: str = row(driver, model).find_element(
        "css selector", "[data-f=memory] .fig[data-kind=ram]").text
    measured = not text.startswith("\u2013")  # the page's dash for "not measured yet"
    return text if measured and text.endswith("MiB") else ""


def journal(driver: Any) -> str:
    text: str = driver.find_element("css selector", "#journal-lines").text
    return text


def test_dashboard_load_pin_unload(llamad_factory: Factory, browser: Any) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], **SETTINGS)
    unit = "llama-server@gemma-b.service"
    browser.get(d.url + "/dashboard")
    until(browser, "the live feed", lambda: browser.find_element(
        "css selector", "body[data-live=yes]"))
    browser.execute_script("window.sameDocument = true")  # gone if the page reloads
    assert row(browser, "gemma-b").get_attribute("data-state") == "unloaded"
    click(browser, "#models tr[data-model='gemma-b'] button[data-action=load]", "Load")
    until(browser, "gemma-b ready", lambda: row(browser, "gemma-b").get_attribute(
        "data-state") == "ready")
    figures = until(browser, "gemma-b's measured memory", lambda: _ram_shown(browser, "gemma-b"))
    assert "of est." in figures
    assert d.show(unit, "ActiveState") == "active"
    pid = d.show(unit, "MainPID")
    until(browser, "the PID shown", lambda: f"PID {pid}" in row(browser, "gemma-b").text)
    assert "CPU" in row(browser, "gemma-b").find_element("css selector",
                                                          "[data-f=placement]").text
    # The model's journal, streamed live from journald.
    click(browser, "#models tr[data-model='gemma-b'] button[data-action=journal]", "Journal")
    until(browser, "the journal of gemma-b's unit", lambda: f"Started {unit}" in journal(browser))
    click(browser, "#models tr[data-model='gemma-b'] button[data-action=pin]", "Pin")
    until(browser, "gemma-b pinned", lambda: models(d.url)["gemma-b"]["llamad"]["pinned"])
    until(browser, "the pin shown", lambda: row(browser, "gemma-b").find_element(
        "css selector", "[data-f=pinned]").text == "pinned")
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    click(browser, "#models tr[data-model='gemma-b'] button[data-action=pin]", "Unpin")
    until(browser, "gemma-b unpinned", lambda: not models(d.url)["gemma-b"]["llamad"]["pinned"])
    click(browser, "#models tr[data-model='gemma-b'] button[data-action=unload]", "Unload")
    until(browser, "gemma-b shown unloaded", lambda: row(browser, "gemma-b").get_attribute(
        "data-state") == "unloaded")
    rig.wait_for(f"{unit} gone", lambda: unit not in d.model_units())
    until(browser, "the stop in the journal", lambda: f"Stopped {unit}" in journal(browser))
    until(browser, "the status line updated", lambda: "0 loaded" in browser.find_element(
        "css selector", "#status").text)
    assert browser.execute_script("return window.sameDocument") is True
    browser.save_screenshot(str(ARTIFACTS / "dashboard-unloaded.png"))
    assert not leaving_the_machine(requests_made(browser))

