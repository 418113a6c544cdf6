"""The chat page in a real headless browser (Chromium and chromedriver from the system packages,
driven by Selenium): load /, send a message, watch the reply stream in, press stop (the server
cancels the request and frees its blocks), start a new chat."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from serving import Server, tiny_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytest.importorskip("fastapi", reason="llmlab serve needs the serve extra: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"no headless browser: {' and '.join(missing)} missing "
                                                      "(apt-get install chromium chromium-driver; .ci/run does)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage")


def wait_for(what, timeout: float = 30.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


@pytest.mark.slow
def test_the_chat_page_streams_a_reply_and_stops_it(tmp_path):
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    run = tiny_run(tmp_path / "tiny", block_size=2048)  # a reply long enough to stop mid-stream
    server = Server(run, "--max-batch", "2", "--block-size", "64", log=tmp_path / "server.log")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        find = lambda css: driver.find_element(By.CSS_SELECTOR, css)  # noqa: E731
        assert wait_for(lambda: find("#model").text == "tiny"), find("#model").text  # /v1/models answered
        assert find("#temperature").get_attribute("value") == "0.8"  # the settings are shown
        max_tokens = find("#max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("1900")
        start = server.metrics()
        find("#input").send_keys("Hello there")
        find("#send").click()
        assert wait_for(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".user")] == ["Hello there"])
        reply = lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant")[0].text  # noqa: E731
        first = wait_for(lambda: len(reply()) > 0 and reply())
        assert first, "no text streamed in"
        grown = wait_for(lambda: len(reply()) > len(first) and reply())
        assert grown and grown.startswith(first)  # it grows piece by piece
        assert find("#stop").is_enabled() and not find("#send").is_enabled()
        assert server.metrics()["llmlab_requests_running"] == 1
        find("#stop").click()
        assert wait_for(lambda: "stopped" in reply()), reply()
        assert wait_for(lambda: find("#send").is_enabled())
        end = server.wait_metric("llmlab_cache_free_blocks", start["llmlab_cache_free_blocks"])
        assert end["llmlab_requests_running"] == 0
        assert end["llmlab_cache_free_blocks"] == start["llmlab_cache_free_blocks"]
        assert end["llmlab_requests_finished_total{reason=cancelled}"] == 1
        find("#new").click()
        assert wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, ".msg"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
        assert server.stop() == 0, server.output()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
