"""`finetune web` in a real browser: the page started as a user starts it (a subprocess), driven by headless
Chromium (Debian's chromium + chromium-driver, through selenium) through the tiny demo recipe — estimate, train,
stop (a checkpoint is saved), resume to the end, export to merged, one chat message — with a screenshot at each
stage that must exist and not be blank."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="`finetune web` needs the web extra: pip install 'finetune[web]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless Chromium is not installed: apt-get "
                                "install chromium chromium-driver (scripts/test.sh does it when run as root)")


SETTINGS = "train.max_steps=40 train.logging_steps=1 train.save_steps=1000 train.sample_prompts=0 data.max_samples=2"
"""The demo's recipe on two answers (as tests/e2e/conftest.py): long enough to be stopped midway, learnt by the end."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page_url(tmp_path):
    port = free_port()
    log = (tmp_path / "web.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "finetune", "web", f"port={port}"], cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert server.poll() is None, (tmp_path / "web.log").read_text()[-3000:]
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(check, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            found = check()
        except Exception:  # the element is being re-rendered
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def text_of(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def choose(driver, elem_id: str, value: str) -> None:
    """A Gradio dropdown: type to filter, then click the matching option."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value)
    option = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} li[role=option][aria-label='{value}']"),
                      20, f"option {value}")
    option[0].click()


def tab(driver, name: str) -> None:
    [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name][0].click()
    time.sleep(1)


def train_log(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#train-log textarea").get_attribute("value")


def shot(driver, path: Path) -> Path:
    from PIL import Image

    driver.save_screenshot(str(path))
    assert path.is_file()
    with Image.open(path) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 16, f"{path.name} looks blank ({len(colors)} colours)"
    return path


def test_page_estimates_trains_exports_and_chats_through_the_tiny_recipe(page_url, browser, tmp_path):
    browser.get(page_url)
    wait_for(lambda: browser.find_elements(By.ID, "recipe"), 60, "the page")
    choose(browser, "recipe", "tiny_qwen2_5_demo")
    verdict = wait_for(lambda: (t := text_of(browser, "verdict")) and ("needs" in t or "fits" in t) and t, 120,
                       "the verdict")
    assert "tiny_qwen2_5_demo" in verdict and "GiB" in verdict
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chart img"), 60, "the breakdown chart")
    extra = browser.find_element(By.CSS_SELECTOR, "#extra textarea, #extra input")
    extra.send_keys(SETTINGS, Keys.ENTER)
    wait_for(lambda: "max_steps=40" in browser.find_element(By.CSS_SELECTOR, "#command textarea, #command input")
             .get_attribute("value"), 60, "the command line with the extra settings")
    shot(browser, tmp_path / "1-estimate.png")

    # a bad value gets the CLI's one line, not a traceback
    browser.find_element(By.CSS_SELECTOR, "#extra textarea, #extra input").send_keys(" lora.rnk=8", Keys.ENTER)
    wait_for(lambda: "unknown key 'lora.rnk'" in text_of(browser, "verdict"), 60, "the error line")
    extra = browser.find_element(By.CSS_SELECTOR, "#extra textarea, #extra input")
    extra.send_keys(Keys.CONTROL, "a")
    extra.send_keys(SETTINGS, Keys.ENTER)
    wait_for(lambda: "error" not in text_of(browser, "verdict"), 60, "the verdict again")

    tab(browser, "Train")
    browser.find_element(By.ID, "start").click()
    wait_for(lambda: re.search(r"running .* step ([2-9]|\d\d) ", text_of(browser, "train-status")), 300,
             "the first logged steps")
    browser.find_element(By.ID, "stop").click()  # SIGINT: the trainer saves a checkpoint and stops
    wait_for(lambda: re.match(r"(stopped|done|failed)", text_of(browser, "train-status")), 300, "the stop")
    assert text_of(browser, "train-status").startswith("stopped"), train_log(browser)
    run = next(p for p in (tmp_path / "outputs").iterdir() if p.is_dir())
    assert list((run / "checkpoints").glob("checkpoint-*/trainer_state.json")), "no checkpoint saved at the stop"
    shot(browser, tmp_path / "2-stopped.png")

    browser.find_element(By.ID, "resume").click()  # the run picked is the one just started
    wait_for(lambda: re.match(r"(done|failed)", text_of(browser, "train-status")), 480, "the resumed run to finish")
    status = text_of(browser, "train-status")
    assert status.startswith("done") and "step 40" in status, status + train_log(browser)
    assert (run / "summary.json").is_file()
    wait_for(lambda: "finished" in text_of(browser, "runs"), 30, "the run listed as finished")
    shot(browser, tmp_path / "3-train.png")

    tab(browser, "Export")
    choose(browser, "target", "merged")
    browser.find_element(By.ID, "export").click()
    wait_for(lambda: any(w in text_of(browser, "export-status") for w in ("done", "failed")), 480, "the export")
    assert "done" in text_of(browser, "export-status")
    assert (run / "export" / "merged" / "config.json").is_file()
    shot(browser, tmp_path / "4-export.png")

    tab(browser, "Chat")
    message = browser.find_element(By.CSS_SELECTOR, "#message textarea")
    message.send_keys("你是谁？")
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#chatbot .message")) >= 2, 300, "the answer")
    answer = browser.find_elements(By.CSS_SELECTOR, "#chatbot .message")[-1].text.strip()
    cli = subprocess.run([sys.executable, "-m", "finetune", "chat", f"run={run}", "prompt=你是谁？"],
                         capture_output=True, text=True, timeout=300)
    assert answer and answer == cli.stdout.strip(), (answer, cli.stdout, cli.stderr[-2000:])  # the chat command's answer
    shot(browser, tmp_path / "5-chat.png")

    browser.find_element(By.CSS_SELECTOR, "#lang label:nth-of-type(2)").click()  # 中文
    wait_for(lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "对话"],
             30, "the Chinese labels")
    shot(browser, tmp_path / "6-zh.png")
