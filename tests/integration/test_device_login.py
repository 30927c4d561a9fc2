"""``corral login`` end to end: the CLI asks for a code, a person approves it in a real browser (headless
Chromium on the /activate page), the CLI receives a key, saves it 0600, and ``corral whoami`` uses it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import Account, Server


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "corral", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _approve_in_browser(driver: webdriver.Chrome, url: str, code: str, email: str, password: str) -> str:
    """Fill in and submit the form; returns the text of the page that answers (waiting for it to load)."""
    driver.get(url)
    assert driver.find_element(By.ID, "code").get_attribute("value") == code  # prefilled from ?code=
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.ID, "password").send_keys(password)
    form = driver.find_element(By.TAG_NAME, "form")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # chromedriver can fail a check while the page is being replaced ("unhandled inspector error"): try again
    WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.staleness_of(form)
    )
    return str(driver.find_element(By.TAG_NAME, "body").text)


def test_cli_login_approved_in_a_browser(
    server: Server, account: Account, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("CORRAL_API_KEY", None)
    proc = _cli("login", "--url", server.url, "--interval", "0.2", "--timeout", "60", env=env)
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        code = proc.stdout.readline().strip()
        prompt = proc.stderr.readline()
        assert f"{server.url}/activate?code={code}" in prompt

        # a wrong password does not approve
        page = _approve_in_browser(
            browser, f"{server.url}/activate?code={code}", code, account.email, "wrong-pass"
        )
        assert page.startswith("Corral device login")
        assert "Wrong email or password" in page

        page = _approve_in_browser(
            browser, f"{server.url}/activate?code={code}", code, account.email, account.password
        )
        assert page.startswith("Device approved")
        assert code in page
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    creds = tmp_path / "config" / "corral" / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600

    whoami = subprocess.run(
        [sys.executable, "-m", "corral", "whoami"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert whoami.returncode == 0, whoami.stderr
    assert account.email in whoami.stdout
    assert str(account.user["id"]) in whoami.stdout


def test_cli_login_reports_an_expired_code(tmp_path: Path) -> None:
    from tests.support import running_server

    with running_server(tmp_path, CORRAL_DEVICE_CODE_TTL="1") as server:
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "corral",
                "login",
                "--url",
                server.url,
                "--interval",
                "0.5",
                "--timeout",
                "20",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert "expired" in done.stderr
    assert not (tmp_path / "config" / "corral" / "credentials.json").exists()


def test_activate_page_cannot_be_framed_or_cached(server: Server) -> None:
    with server.client() as anon:
        page = anon.get("/activate", params={"code": "<script>x</script>"})
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert "<script>x</script>" not in page.text  # the code is escaped


def test_activate_refuses_unstorable_form_text(server: Server) -> None:
    with server.client() as anon:
        for field in ("email", "password", "code"):
            form = {"code": "ABCD-1234", "email": "a@example.com", "password": "whatever1", field: "a\x00b"}
            resp = anon.post("/activate", data=form)
            assert resp.status_code == 400, field
            assert "not allowed" in resp.text
