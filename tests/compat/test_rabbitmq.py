"""The `/v1` door again on RabbitMQ as the broker: background and streamed Responses, and a batch (its
`batches.advance` steps travel by name through the AMQP publisher and the worker's delayed sends).
Skipped with a clear reason when TEST_AMQP_URL is unset."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from tests.compat.test_batches import (
    test_a_batch_of_hundreds_of_lines_with_bad_ones_ends_with_output_and_error_files,
    test_cancel_ends_a_batch_cancelled_and_is_idempotent,
)
from tests.compat.test_responses import (
    test_background_create_is_queued_at_once_then_retrieved_completed,
    test_chat_completions_wait_for_the_queue,
)
from tests.compat.test_streaming import test_a_dropped_stream_resumes_after_the_last_event_seen
from tests.support.stack import Stack

__all__ = [
    "test_a_batch_of_hundreds_of_lines_with_bad_ones_ends_with_output_and_error_files",
    "test_a_dropped_stream_resumes_after_the_last_event_seen",
    "test_background_create_is_queued_at_once_then_retrieved_completed",
    "test_cancel_ends_a_batch_cancelled_and_is_idempotent",
    "test_chat_completions_wait_for_the_queue",
]


@pytest.fixture
def stack(amqp_stack: Stack) -> Stack:
    """This module's tests (and the SDK clients they take) run on the RabbitMQ stack."""
    return amqp_stack


@pytest.fixture
def db(amqp_db: Engine) -> Engine:
    """Rows are read in the RabbitMQ stack's own database."""
    return amqp_db
