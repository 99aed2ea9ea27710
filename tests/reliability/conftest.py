"""One local Ray with Serve for the whole package: starting Ray takes tens of seconds on a
busy two-core machine, so each module deploys its own application on the shared instance."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.reliability.helpers import LocalServe, local_ray_serve

# pytest sets a failed fixture up again for every test that uses it. One failed start is
# enough to report, so later tests fail at once with the first error.
_startup_errors: list[BaseException] = []


@pytest.fixture(scope="package")
def shared_serve() -> Iterator[LocalServe]:
    """Ray and Serve on 127.0.0.1, started on first use and stopped after the package."""
    if _startup_errors:
        pytest.fail(f"the local Ray with Serve failed to start: {_startup_errors[0]}")
    with contextlib.ExitStack() as stack:
        try:
            serve = stack.enter_context(local_ray_serve())
        except Exception as error:
            _startup_errors.append(error)
            raise
        yield serve
