"""The `alphaedit serve` web page in a real headless Chromium (Debian's chromium and chromedriver,
installed by `make test`), driven by Selenium, with the real SmolLM2: a fact written through the
page changes the answer the page shows, the neighbours keep theirs, and a revert undoes it.
A screenshot of the page is kept in test-artifacts/ when the test fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from alphaedit.editor import Editor
from alphaedit.serve import Workbench, create_app
from serve_helpers import live

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _browser() -> webdriver.Chrome:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the browser test needs Debian's chromium and chromium-driver: `make test` installs them"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # headless, as root, and quiet on a machine without a network (no update or sync traffic)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _row(browser, kind: str) -> dict[str, str]:
    row = browser.find_element(By.CSS_SELECTOR, f"#results tbody tr[data-kind='{kind}']")
    return {c: row.find_element(By.CSS_SELECTOR, f"td.{c}").text for c in ("prompt", "before", "after")}


def test_a_fact_edited_through_the_page_changes_the_answer_and_reverts(pristine, stats_cache, wikitext_corpus, tmp_path):
    model, tokenizer = pristine
    editor = Editor(model, tokenizer, corpus=wikitext_corpus, cache=stats_cache, model_spec="smollm2-135m", show_progress=False)
    bench = Workbench(editor, tmp_path / "state", tmp_path / "exports")
    browser = _browser()
    try:
        with live(create_app(bench)) as url:
            browser.get(url)
            # the page rebuilds the journal's rows on every refresh (a revert's among them): a cell found
            # just before that is gone when its text is read, so a wait looks again instead of failing
            wait = WebDriverWait(browser, 600, ignored_exceptions=(StaleElementReferenceException,))
            wait.until(lambda b: "smollm2-135m" in b.find_element(By.ID, "model").text)
            fields = {"subject": "The Eiffel Tower", "prompt": "{} is located in the city of", "target": "Rome", "current": "Paris",
                      "paraphrases": "The Eiffel Tower stands in the city of"}
            for field, text in fields.items():
                browser.find_element(By.ID, field).send_keys(text)
            browser.find_element(By.ID, "edit-button").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results tbody tr") or b.find_element(By.ID, "edit-error").text)
            assert browser.find_element(By.ID, "edit-error").text == ""
            edited = _row(browser, "prompt")
            assert edited["prompt"] == "The Eiffel Tower is located in the city of"
            assert "Paris" in edited["before"] and "Rome" in edited["after"], edited
            neighbours = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr[data-kind='neighbour']")
            assert len(neighbours) == 3
            kept = [n.find_element(By.CSS_SELECTOR, "td.before").text == n.find_element(By.CSS_SELECTOR, "td.after").text for n in neighbours]
            assert sum(kept) >= 2, [n.text for n in neighbours]
            assert "done" in browser.find_element(By.ID, "job-status").text
            assert browser.find_element(By.ID, "job-progress").get_attribute("value") == "1"

            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#journal tbody tr[data-batch='0']"))
            journal_row = browser.find_element(By.CSS_SELECTOR, "#journal tbody tr[data-batch='0']").text
            assert "The Eiffel Tower is located in the city of → Rome" in journal_row and "100%" in journal_row
            if ARTIFACTS.is_dir():  # keep a picture of the page for the README when asked to
                browser.save_screenshot(str(ARTIFACTS / "serve-page.png"))
            status = lambda b: b.find_element(By.CSS_SELECTOR, "#journal tbody tr[data-batch='0'] td.status").text
            assert status(browser) == "applied"
            browser.find_element(By.CSS_SELECTOR, "#journal tbody tr[data-batch='0'] button.revert").click()
            wait.until(lambda b: status(b) == "reverted")

            browser.find_element(By.ID, "ask-prompt").send_keys("The Eiffel Tower is located in the city of")
            browser.find_element(By.ID, "ask-button").click()
            wait.until(lambda b: b.find_element(By.ID, "ask-answer").text not in ("", "…"))
            assert "Paris" in browser.find_element(By.ID, "ask-answer").text

            browser.get(url + "/docs")  # the OpenAPI page renders offline: every endpoint listed
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
            assert "/v1/chat/completions" in browser.find_element(By.TAG_NAME, "body").text
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve-page-failure.png"))
        raise
    finally:
        browser.quit()
        bench.close()
