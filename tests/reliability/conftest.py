"""One local Ray with Serve for the whole package: starting Ray takes tens of seconds on a
busy two-core machine, so each module deploys its own application on the shared instance."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.helpers import LocalServe, local_ray_serve


@pytest.fixture(scope="package")
def shared_serve() -> Iterator[LocalServe]:
    """Ray and Serve on 127.0.0.1, started on first use and stopped after the package."""
    with local_ray_serve() as serve:
        yield serve
