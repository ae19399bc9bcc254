"""The web chat page in a real headless browser (Debian's chromium, driven by selenium): a question with an
image, the answer streamed onto the page, the conversation cleared, and the page behind an API key."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.apps.generation import load_inference_bundle
from pipeline.apps.serve.app import ServerThread, create_app
from tests.apps.test_serve import MODEL, ask, options
from tests.helpers import copy_twin, free_port

KEY = "page-key"
# Debian's packages (`apt-get install chromium chromium-driver`, which `make install` runs)
CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"
# records every text the answer shows, so the test sees it grow
RECORD_UPDATES = """
window.updates = [];
new MutationObserver(() => {
  const last = document.querySelector('.msg.assistant:last-of-type span');
  if (last) window.updates.push(last.textContent);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""

# drops the image of a data: URL onto the page, as a file dragged from the desktop
DROP_IMAGE = """
const [header, payload] = arguments[0].split(",");
const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], "dropped.png", {type: header.slice(5).split(";")[0]}));
document.getElementById("log").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
"""


def find_browser() -> tuple[str, str]:
    """Returns the chromium and chromedriver executables; fails (never skips) when they are missing."""
    browser = next((path for name in CHROMIUM if (path := shutil.which(name))), None)
    driver = shutil.which(CHROMEDRIVER)
    if browser is None or driver is None:
        pytest.fail(
            "the page test needs Debian's chromium and chromedriver: apt-get install chromium chromium-driver "
            "(make install does it when apt-get is there)",
            pytrace=False,
        )
    return browser, driver


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_twin) -> Path:
    root = tmp_path_factory.mktemp("page")
    copy_twin(tiny_twin, root / "tiny")
    Image.new("RGB", (112, 112), (230, 200, 30)).save(root / "yellow.png")
    return root


@pytest.fixture(scope="module")
def servers(workdir: Path):
    """One server without a key and one with it, over the same model."""
    bundle, family = load_inference_bundle(str(workdir / "tiny"), device="cpu")
    running = [
        ServerThread(create_app(bundle, options(), MODEL, family), "127.0.0.1", free_port()),
        ServerThread(create_app(bundle, options(api_key=KEY), MODEL, family), "127.0.0.1", free_port()),
    ]
    yield running
    for server in running:
        server.stop()


def headless_chrome() -> webdriver.Chrome:
    """Returns a headless Chromium driven by chromedriver (find_browser); quit() it when done."""
    binary, driver_path = find_browser()
    chrome = webdriver.ChromeOptions()
    chrome.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,700",
    ):
        chrome.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=chrome)


@pytest.fixture(scope="module")
def browser():
    driver = headless_chrome()
    yield driver
    driver.quit()


def ask_on_page(driver, question: str, image: Path | None = None) -> str:
    """Returns the answer the page shows after typing `question` (with `image` attached) and sending it."""
    done = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    if image is not None:
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "attached").is_displayed())
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 60).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) > done
            or d.find_elements(By.CSS_SELECTOR, ".msg.error")
        )
    )
    errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert not errors, errors[0].text
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[-1].text


def test_page_asks_with_an_image_and_streams_the_answer(servers, browser, workdir):
    server = servers[0]
    browser.get(server.url + "/")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
    browser.execute_script(RECORD_UPDATES)
    answer = ask_on_page(browser, "What colour is the square?", workdir / "yellow.png")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    data_url = browser.find_element(By.CSS_SELECTOR, ".msg.user img").get_attribute("src")
    expected = ask(client, "What colour is the square?", data_url).choices[0].message.content
    # the page asks for serve.max_new_tokens, the API call for MAX_TOKENS: the same here
    assert answer == expected.strip()
    updates = browser.execute_script("return window.updates")
    assert updates and updates[-1] == expected  # the answer was written onto the page as it arrived
    # a second question continues the conversation; Clear starts a new one
    ask_on_page(browser, "And its shape?")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    browser.find_element(By.ID, "clear").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    # an image dropped onto the page goes with the next question
    browser.execute_script(DROP_IMAGE, data_url)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "attached").is_displayed())
    assert ask_on_page(browser, "What colour is the square?") == answer
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1


def test_page_behind_an_api_key_works_once_signed_in(servers, browser, workdir):
    server = servers[1]
    host = server.url.removeprefix("http://")
    browser.get(f"http://anyone:{KEY}@{host}/")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
    assert ask_on_page(browser, "What colour is the square?", workdir / "yellow.png") is not None
