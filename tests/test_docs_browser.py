"""The docs page in a real browser (Debian's Chromium, headless) against the real service."""

import json
import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from http_client import call
from service_process import ServiceProcess
from test_contract import documented_operations

pytestmark = pytest.mark.cluster
ADA = {"name": "Ada", "lastName": "Lovelace", "email": "ada@example.com"}
WAIT_SECONDS = 60
# Set to a file name to keep a screenshot of the page (docs/docs-page.png was taken so).
SCREENSHOT = os.environ.get("DOCS_SCREENSHOT")


def chromium_and_driver() -> tuple[str, str]:
    """Return the paths of Debian's chromium and chromedriver, or skip (fail in CI)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "no chromium or chromedriver: apt-get install chromium chromium-driver (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a fresh profile, logging every request it sends."""
    binary, driver = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1800",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def requested_urls(chrome) -> list:
    """Return the URL of every request the page has sent so far."""
    urls = []
    for entry in chrome.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def rendered_operations(chrome) -> set:
    """Return (path, method) of every operation the page shows."""
    shown = set()
    for block in chrome.find_elements(By.CSS_SELECTOR, ".opblock"):
        method = block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text
        path = block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute(
            "data-path")
        shown.add((path, method.lower()))
    return shown


def try_getting_a_customer(chrome, customer_id: str) -> str:
    """Open GET /customers/{customer_id}, try it out with the id, and return the response body."""
    wait = WebDriverWait(chrome, WAIT_SECONDS)
    block = chrome.find_element(By.ID, "operations-default-getCustomer")
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0].click()
    field = wait.until(lambda _: block.find_elements(
        By.CSS_SELECTOR, 'tr[data-param-name="customer_id"] input'))[0]
    field.send_keys(customer_id)
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait.until(lambda _: block.find_elements(
        By.CSS_SELECTOR, ".live-responses-table .response .response-col_status"))[0]
    body = block.find_element(By.CSS_SELECTOR,
                              ".live-responses-table .response-col_description pre")
    return status.text + "\n" + body.text


def test_the_page_shows_every_operation_and_tries_a_get_on_its_own_origin(
        empty_redis_cluster, browser, tmp_path):
    env = {**empty_redis_cluster.service_env(), "WORKERS": "1", "LOG_LEVEL": "WARNING"}
    with ServiceProcess(env) as service:
        assert call(service.url + "/customers/ada1", "PUT", ADA)[0] == 201
        requested_urls(browser)  # what the browser sent before it opened the page
        browser.get(service.url + "/docs")
        expected = documented_operations()
        WebDriverWait(browser, WAIT_SECONDS).until(
            lambda chrome: len(chrome.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(expected))
        assert rendered_operations(browser) == expected
        assert "Customers service" in browser.find_element(By.CSS_SELECTOR, ".info .title").text

        answer = try_getting_a_customer(browser, "ada1")
        assert answer.startswith("200")
        assert json.loads(answer.split("\n", 1)[1]) == {"id": "ada1", **ADA}
        if SCREENSHOT:
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(SCREENSHOT)

        urls = requested_urls(browser)
        assert f"{service.url}/customers/ada1" in urls
        assert f"{service.url}/openapi.json" in urls
        elsewhere = [url for url in urls
                     if not url.startswith((service.url + "/", "data:", "blob:"))]
        assert elsewhere == [], urls
        # Nor did the page try to: the Content-Security-Policy would have refused it, saying so.
        refused = [entry["message"] for entry in browser.get_log("browser")
                   if "Content Security Policy" in entry["message"]]
        assert refused == []
    assert "Traceback" not in service.printed
