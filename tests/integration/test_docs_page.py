"""``/docs`` renders every operation in a real browser, from assets the server itself serves (no CDN)."""

from __future__ import annotations

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import Server


def test_docs_render_offline(server: Server, browser: webdriver.Chrome) -> None:
    with server.client() as anon:
        schema = anon.get("/openapi.json").json()
        page = anon.get("/docs").text
    assert "cdn." not in page
    operations = sum(len(ops) for ops in schema["paths"].values())

    browser.get(f"{server.url}/docs")
    WebDriverWait(browser, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == operations
    )
    summaries = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v1/secrets/{secret_id}" in summaries
    assert browser.find_elements(By.CSS_SELECTOR, ".btn.authorize")  # bearer auth is offered
