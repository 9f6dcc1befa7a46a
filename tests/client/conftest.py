"""The client tests run against real server processes: the service tests' launcher and
tiny model repository (``tests/service/conftest.py``), reused, not copied."""

from tests.service.conftest import (  # noqa: F401  (fixtures)
    make_settings,
    model_repo,
    server,
    start_server,
)
