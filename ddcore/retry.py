"""Which failures a retry can fix, and the one retry loop with backoff that uses them.

Transient: I/O, network and storage errors (a flaky S3 endpoint, a reset connection). Permanent:
a missing file, a permission problem, a path that is a folder, a feature that does not exist;
those fail at once. The Prefect flow's retry condition and `with_retries` read the same lists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("ddcore.retry")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotImplementedError,
)

T = TypeVar("T")


def is_transient(err: BaseException) -> bool:
    return isinstance(err, TRANSIENT_ERRORS) and not isinstance(err, PERMANENT_ERRORS)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4, delay_s: float = 2.0) -> T:
    """`fn()`, retried on transient failures with exponential backoff; others fail at once."""
    for i in range(attempts):
        try:
            return fn()
        except TRANSIENT_ERRORS as e:
            if i == attempts - 1 or not is_transient(e):
                raise
            wait = delay_s * 2**i
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.0f s",
                what,
                type(e).__name__,
                e,
                i + 1,
                attempts - 1,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")
