"""Login and registration throttling, and the client address behind trusted proxies."""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path

import httpx
import pytest

from shared.limits import client_address
from tests.support.api import TEST_PASSWORD
from tests.support.limits import tight_apis
from tests.support.stack import Stack


def _login(api: httpx.Client, email: str, password: str, address: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": address} if address else {}
    return api.post("/api/v1/auth/login", json={"email": email, "password": password}, headers=headers)


def _register(api: httpx.Client, address: str | None = None) -> tuple[str, httpx.Response]:
    email = f"t-{uuid.uuid4().hex[:10]}@example.com"
    headers = {"X-Forwarded-For": address} if address else {}
    r = api.post("/api/v1/auth/register", json={"email": email, "password": TEST_PASSWORD}, headers=headers)
    return email, r


def test_login_locks_out_after_failures_growing_and_per_address(stack: Stack, tmp_path: Path) -> None:
    with (
        tight_apis(stack, tmp_path, LOGIN_MAX_FAILURES="3", TRUSTED_PROXIES="127.0.0.1/32") as (url,),
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        email, r = _register(api)
        assert r.status_code == 201
        for _ in range(3):
            assert _login(api, email, "wrong password", "198.51.100.2").status_code == 401
        locked = _login(api, email, TEST_PASSWORD, "198.51.100.2")
        assert locked.status_code == 429
        assert locked.json()["error"]["code"] == "login_throttled"
        first_wait = int(locked.headers["Retry-After"])
        assert 1 <= first_wait <= 2
        # The owner at another address still gets in, and that does not reset the attacker's address.
        assert _login(api, email, TEST_PASSWORD, "198.51.100.1").status_code == 200
        assert _login(api, email, TEST_PASSWORD, "198.51.100.2").status_code == 429
        time.sleep(first_wait + 0.2)
        assert _login(api, email, "wrong again", "198.51.100.2").status_code == 401
        growing = _login(api, email, "wrong again", "198.51.100.2")
        assert growing.status_code == 429
        assert int(growing.headers["Retry-After"]) > first_wait


def test_wrong_current_passwords_are_throttled_as_failed_logins_of_the_account(stack: Stack, tmp_path: Path) -> None:
    # A stolen access token must not be a way to guess the password faster than the login allows: the password
    # change checks the current one on the login's own counters.
    with (
        tight_apis(stack, tmp_path, LOGIN_MAX_FAILURES="3", TRUSTED_PROXIES="127.0.0.1/32") as (url,),
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        email, r = _register(api)
        assert r.status_code == 201
        access = _login(api, email, TEST_PASSWORD).json()["access_token"]
        attacker = {"Authorization": f"Bearer {access}", "X-Forwarded-For": "198.51.100.2"}

        def change(current: str) -> httpx.Response:
            body = {"current_password": current, "new_password": "a brand new passphrase, 2027"}
            return api.post("/api/v1/auth/password", json=body, headers=attacker)

        for guess in ("guess one", "guess two"):
            assert change(guess).status_code == 400
        # Failed logins and failed password checks add up.
        assert _login(api, email, "guess three", "198.51.100.2").status_code == 401
        locked = change(TEST_PASSWORD)
        assert locked.status_code == 429
        assert locked.json()["error"]["code"] == "login_throttled"
        assert int(locked.headers["Retry-After"]) >= 1
        assert _login(api, email, TEST_PASSWORD, "198.51.100.2").status_code == 429
        # Nothing changed: the password is still the old one (from an address not locked out).
        assert _login(api, email, TEST_PASSWORD, "198.51.100.1").status_code == 200


def test_form_logins_count_as_failures_too(stack: Stack, tmp_path: Path) -> None:
    # The OAuth2 form answers a wrong password with a returned 400 (RFC 6749), not a raised error: it must
    # still count, or the form is an unthrottled way to guess passwords.
    with (
        tight_apis(stack, tmp_path, LOGIN_MAX_FAILURES="3") as (url,),
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        email, r = _register(api)
        assert r.status_code == 201
        for i in range(3):
            wrong = api.post("/api/v1/auth/login", data={"username": email, "password": f"wrong {i}"})
            assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
        locked = api.post("/api/v1/auth/login", data={"username": email, "password": TEST_PASSWORD})
        assert locked.status_code == 429
        assert locked.json()["error"]["code"] == "login_throttled"
        assert int(locked.headers["Retry-After"]) >= 1
        assert _login(api, email, TEST_PASSWORD).status_code == 429


def test_unknown_and_known_emails_get_the_same_answer(stack: Stack, tmp_path: Path) -> None:
    with (
        tight_apis(stack, tmp_path, LOGIN_MAX_FAILURES="3") as (url,),
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        email, _ = _register(api)
        unknown = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
        for _ in range(3):
            known_r, unknown_r = _login(api, email, "wrong password"), _login(api, unknown, "wrong password")
            assert (known_r.status_code, known_r.json()) == (unknown_r.status_code, unknown_r.json())
        known_r, unknown_r = _login(api, email, "wrong password"), _login(api, unknown, "wrong password")
        assert known_r.status_code == unknown_r.status_code == 429


def test_unknown_emails_take_as_long_as_wrong_passwords(stack: Stack, tmp_path: Path) -> None:
    with (
        tight_apis(stack, tmp_path, BCRYPT_ROUNDS="10", TRUSTED_PROXIES="127.0.0.1/32") as (url,),
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        email, _ = _register(api)
        unknown = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
        _login(api, unknown, "warm-up", "203.0.113.99")
        known_t, unknown_t = [], []
        for i in range(4):
            for target, times in ((email, known_t), (unknown, unknown_t)):
                started = time.perf_counter()
                r = _login(api, target, "wrong password", f"203.0.113.{i}")
                times.append(time.perf_counter() - started)
                assert r.status_code == 401
    known, unknown_median = statistics.median(known_t), statistics.median(unknown_t)
    assert abs(known - unknown_median) <= 0.5 * max(known, unknown_median), (known_t, unknown_t)


def test_registration_is_throttled_per_client_address(stack: Stack, tmp_path: Path) -> None:
    with (
        tight_apis(stack, tmp_path, REGISTER_PER_HOUR="3", TRUSTED_PROXIES="127.0.0.1/32") as (url,),
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        for _ in range(3):
            assert _register(api, "192.0.2.10")[1].status_code == 201
        refused = _register(api, "192.0.2.10")[1]
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "register_throttled"
        assert 1000 <= int(refused.headers["Retry-After"]) <= 1200
        assert _register(api, "192.0.2.11")[1].status_code == 201


def test_forwarded_for_counts_only_from_trusted_proxies(stack: Stack, tmp_path: Path) -> None:
    with (
        tight_apis(stack, tmp_path, REGISTER_PER_HOUR="2") as (url,),
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        assert _register(api, "192.0.2.20")[1].status_code == 201
        assert _register(api, "192.0.2.21")[1].status_code == 201
        # 127.0.0.1 is not a trusted proxy here: the header is ignored and both counted as the peer.
        assert _register(api, "192.0.2.22")[1].status_code == 429


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("10.0.0.5", "1.2.3.4", [], "10.0.0.5"),
        ("10.0.0.5", "1.2.3.4", ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.5", "6.6.6.6, 1.2.3.4, 10.0.0.7", ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.5", "garbage, 1.2.3.4", ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.5", "1.2.3.4, garbage", ["10.0.0.0/8"], "10.0.0.5"),
        ("10.0.0.5", "10.0.0.9", ["10.0.0.0/8"], "10.0.0.9"),
        ("::1", "2001:db8::1", ["::1/128"], "2001:db8::1"),
        (None, None, [], "unknown"),
    ],
)
def test_client_address(peer: str | None, forwarded: str | None, trusted: list[str], expected: str) -> None:
    assert client_address(peer, forwarded, trusted) == expected
