"""Property-based fuzzing of the HTTP API from its checked-in OpenAPI document.

Schemathesis generates requests for every operation (valid and invalid
bodies, odd paths, huge numbers, unicode) against a real ``corral serve``;
none may answer 5xx. A share of requests go to a real running sandbox, so the
generated code, commands and paths reach real boxes, not just validation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from .server_helpers import ServerProcess

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here"),
    pytest.mark.slow,
]

schema = schemathesis.openapi.from_path(Path(__file__).parent.parent / "docs" / "openapi.json")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[ServerProcess, str, str]]:
    server = ServerProcess()
    # quotas keep the fuzzer from starting hundreds of boxes
    key = server.key("fuzz", "--max-sandboxes", "4", "--max-lifetime", "120")
    server.start()
    headers = {"Authorization": f"Bearer {key}"}
    created = httpx.post(
        f"{server.url}/v1/sandboxes", json={"runtime": None, "timeout_s": 120}, headers=headers
    )
    assert created.status_code == 201, created.text
    try:
        yield server, key, created.json()["id"]
    finally:
        server.cleanup()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.timeout(300)
def test_no_request_makes_the_server_fail(
    case: schemathesis.Case[Any], fuzz_server: tuple[ServerProcess, str, str]
) -> None:
    server, key, sandbox_id = fuzz_server
    if case.path_parameters and "sandbox_id" in case.path_parameters and hash(str(case)) % 2:
        case.path_parameters["sandbox_id"] = sandbox_id  # half the time: a real, running box
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {key}"})
    case.validate_response(response, checks=[not_a_server_error])
