"""The end-to-end pipeline tests again, on RabbitMQ as the broker (BROKER_URL=amqp://…, a quorum queue).

Every test of tests/worker/test_pipeline.py runs here a second time against `amqp_stack`: its API publishes
with confirms to RabbitMQ, its worker consumes from there, and retries go through RabbitMQ's delayed delivery.
Skipped with a clear reason when TEST_AMQP_URL is unset.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from tests.support.stack import Stack
from tests.worker.test_pipeline import (
    test_duplicate_delivery_never_calls_the_llm_twice,
    test_exhausted_retries_fail_after_max_attempts,
    test_long_poll_answers_when_the_query_ends_not_before,
    test_long_poll_rejects_bad_waits_and_other_users_queries,
    test_long_poll_times_out_with_the_current_state,
    test_permanent_failures_fail_at_once_with_a_clear_code,
    test_rate_limit_honours_retry_after,
    test_secrets_and_prompts_never_reach_the_logs,
    test_submitted_query_completes_with_answer_usage_and_timings,
    test_timeouts_and_dropped_connections_are_transient,
    test_transient_failures_are_retried_to_success,
)

__all__ = [
    "test_duplicate_delivery_never_calls_the_llm_twice",
    "test_exhausted_retries_fail_after_max_attempts",
    "test_long_poll_answers_when_the_query_ends_not_before",
    "test_long_poll_rejects_bad_waits_and_other_users_queries",
    "test_long_poll_times_out_with_the_current_state",
    "test_permanent_failures_fail_at_once_with_a_clear_code",
    "test_rate_limit_honours_retry_after",
    "test_secrets_and_prompts_never_reach_the_logs",
    "test_submitted_query_completes_with_answer_usage_and_timings",
    "test_timeouts_and_dropped_connections_are_transient",
    "test_transient_failures_are_retried_to_success",
]


@pytest.fixture
def stack(amqp_stack: Stack) -> Stack:
    """This module's tests (and the `client`/`user` fixtures they take) run on the RabbitMQ stack."""
    return amqp_stack


@pytest.fixture
def db(amqp_db: Engine) -> Engine:
    """Rows are read and written in the RabbitMQ stack's own database."""
    return amqp_db
