"""The instant "log out everywhere" cuts at, against tokens' `iat` (milliseconds, floored) as the API compares them:
decoded from the JWT on one side, read back from Redis' cached user state on the other."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest

from shared import revocation
from shared.config import Settings
from shared.security import decode_token, issue_token, sessions_cutoff, wait_for_cutoff

pytestmark = pytest.mark.anyio

SETTINGS = Settings(environment="test", jwt_secret_key="k" * 48)  # type: ignore[arg-type]


def _issued_at(user_id: uuid.UUID) -> datetime:
    token, _ = issue_token(SETTINGS, user_id, "access", uuid.uuid4())
    return decode_token(SETTINGS, token, "access").issued_at


async def test_a_token_issued_just_before_is_refused_and_one_issued_just_after_is_accepted() -> None:
    user_id = uuid.uuid4()
    # Many rounds: most land the token before and the cut-off in the same millisecond, the case that needs care.
    for _ in range(200):
        before = _issued_at(user_id)
        cutoff = sessions_cutoff()
        await wait_for_cutoff(cutoff)
        after = _issued_at(user_id)
        cached = revocation.UserState.decode(
            revocation.UserState(disabled=False, sessions_valid_after=cutoff).encode().encode()
        )
        assert cached.sessions_valid_after == cutoff
        # The comparison of shared/services/credentials.py: refused when issued before the cut-off.
        assert before < cutoff
        assert not after < cutoff
