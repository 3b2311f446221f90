"""/docs and /redoc in a real headless Chromium that can reach nothing but 127.0.0.1.

Debian's `chromium` and `chromium-driver` (`make tools` installs them when root), driven by selenium. Every
host other than 127.0.0.1 resolves to nothing, so a CDN asset, a web font or a remote favicon would fail to
load; the Content-Security-Policy is the one the API sends, so a violation shows in the console log.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.api import TEST_PASSWORD, register_and_login
from tests.support.stack import Stack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (`make tools` as root, or apt-get install them)",
)
T = TypeVar("T")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium'}",
        # Air-gapped: every name but 127.0.0.1 fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1400,2000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _eventually(fn: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - the page is still rendering: try again
            last = exc
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} ({last!r})")


def _problems(driver: Any) -> list[str]:
    """Console errors: failed loads, CSP violations, script errors."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def _execute(driver: Any, opblock: Any) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    opblock.find_element(By.CSS_SELECTOR, "button.execute").click()

    def answered() -> dict[str, Any] | None:
        status = opblock.find_element(
            By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"
        ).text.strip()
        body = opblock.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .highlight-code pre").text
        return {"status": int(status), "body": json.loads(body)} if status.isdigit() and body else None

    result = _eventually(answered, "the response of Execute")
    # Clear it, so the next Execute is read fresh.
    opblock.find_element(By.CSS_SELECTOR, "button.btn-clear").click()
    return result


def _try_it_out(browser: Any, selector: str) -> Any:
    """Open an operation (by CSS selector) and press its "Try it out"; the operation's block."""
    from selenium.webdriver.common.by import By

    opblock = browser.find_element(By.CSS_SELECTOR, selector)
    opblock.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    _eventually(lambda: opblock.find_element(By.CSS_SELECTOR, "button.try-out__btn"), "Try it out").click()
    return opblock


def test_swagger_ui_works_offline_authorize_submit_poll(browser: Any, stack: Stack) -> None:
    import httpx
    from selenium.webdriver.common.by import By

    with httpx.Client(base_url=stack.api_url) as client:
        user = register_and_login(client)
    browser.get(f"{stack.api_url}/docs")

    opblocks = _eventually(lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock"), "the operations")
    summaries = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-description")}
    assert "Submit a query" in summaries, summaries
    # GET /users/me once, not under two tags (DELETE /users/me is an operation of its own).
    paths = [e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    methods = [e.text.upper() for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-method")]
    operations = list(zip(methods, paths, strict=True))
    assert operations.count(("GET", "/api/v1/users/me")) == 1, paths
    assert len(opblocks) == len(paths)
    # The OpenAI-compatible door has its own section, with the tag's description saying how to use it.
    section = browser.find_element(By.CSS_SELECTOR, "h3.opblock-tag[data-tag='OpenAI-compatible']")
    assert "base_url=<AIQ>/v1" in section.text, section.text
    assert ("POST", "/v1/chat/completions") in operations, operations

    # Authorize: the OAuth2 password dialog logs in through /api/v1/auth/login's form.
    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    _eventually(lambda: browser.find_element(By.ID, "oauth_username"), "the Authorize dialog").send_keys(user["email"])
    browser.find_element(By.ID, "oauth_password").send_keys(TEST_PASSWORD)
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.authorize").click()
    # Swagger shows "Authorized" and a Logout button only when the token request succeeded.
    _eventually(
        lambda: browser.find_elements(By.XPATH, "//div[contains(@class,'auth-btn-wrapper')]//button[.='Logout']"),
        "a successful Authorize",
    )
    assert "Authorized" in browser.find_element(By.CSS_SELECTOR, ".modal-ux").text
    browser.find_element(By.XPATH, "//div[contains(@class,'auth-btn-wrapper')]//button[.='Close']").click()

    # Try it out: the default body of Submit must be accepted as it stands.
    submit = _try_it_out(browser, "#operations-queries-submit_api_v1_query_post")
    accepted = _execute(browser, submit)
    assert accepted["status"] == 202, accepted
    query_id = accepted["body"]["query_id"]
    uuid.UUID(query_id)

    # Poll: Get a query with that id until it is terminal.
    get = _try_it_out(browser, "#operations-queries-get_api_v1_query__query_id__get")
    get.find_element(By.CSS_SELECTOR, 'tr[data-param-name="query_id"] input').send_keys(query_id)
    wait_input = get.find_element(By.CSS_SELECTOR, 'tr[data-param-name="wait"] input')
    wait_input.clear()
    wait_input.send_keys("5")

    def polled() -> dict[str, Any] | None:
        got = _execute(browser, get)
        assert got["status"] == 200, got
        return got if got["body"]["status"] in ("completed", "failed", "cancelled") else None

    done = _eventually(polled, "the query to finish", timeout=60)
    assert done["body"]["query_id"] == query_id
    assert done["body"]["status"] == "completed", done
    assert done["body"]["response"]

    # Try it out on the /v1 door, with the same authorization: the default body of Create a response is a
    # background response, accepted as it stands.
    create = _try_it_out(browser, "[id$='-create_response_v1_responses_post']")
    created = _execute(browser, create)
    assert created["status"] == 200, created
    assert created["body"]["id"].startswith("resp_"), created
    assert created["body"]["background"] is True, created
    assert _problems(browser) == []


def test_redoc_renders_offline(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{stack.api_url}/redoc")
    operations = _eventually(
        lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, "[data-section-id^='tag/'] h2")],
        "ReDoc's operations",
    )
    assert "Submit a query" in operations, operations
    # ReDoc's "API docs by Redocly" footer points an <img> at cdn.redoc.ly; the page's CSP blocks it before
    # any request leaves (the page needs nothing from there). Anything else is a real problem.
    blocked_logo = "'https://cdn.redoc.ly/redoc/logo-mini.svg' violates the following Content Security Policy"
    assert [p for p in _problems(browser) if blocked_logo not in p] == []


def test_swagger_ui_authorizes_with_an_api_key(browser: Any, stack: Stack) -> None:
    import httpx
    from selenium.webdriver.common.by import By

    with httpx.Client(base_url=stack.api_url) as client:
        user = register_and_login(client)
        created = client.post("/api/v1/keys", json={"name": "docs"}, headers=user["headers"])
        assert created.status_code == 201, created.text
        key = created.json()["key"]
    browser.get(f"{stack.api_url}/docs")
    _eventually(lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock"), "the operations")

    # Authorize: the key goes in the bearer field as it is (the password flow cannot give one).
    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    bearer = _eventually(
        lambda: browser.find_element(
            By.XPATH, "//div[contains(@class,'auth-container')][.//h4[contains(., 'APIKeyBearer')]]"
        ),
        "the bearer section of the Authorize dialog",
    )
    bearer.find_element(By.CSS_SELECTOR, "input").send_keys(key)
    bearer.find_element(By.CSS_SELECTOR, "button.authorize").click()
    _eventually(lambda: bearer.find_elements(By.XPATH, ".//button[.='Logout']"), "the key accepted by the dialog")
    browser.find_element(By.XPATH, "//div[contains(@class,'auth-btn-wrapper')]//button[.='Close']").click()

    # Try it out with the key: the models the /v1 door serves, and one of the caller's own routes.
    models = _try_it_out(browser, "[id$='-list_models_v1_models_get']")
    listed = _execute(browser, models)
    assert listed["status"] == 200, listed
    assert listed["body"]["object"] == "list"
    assert listed["body"]["data"], listed
    assert _problems(browser) == []
