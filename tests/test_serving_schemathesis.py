"""Property-based API fuzzing with schemathesis: no input gives a server error (500).

Runs against a real uvicorn server, with the service's own OpenAPI schema and an admin token
(which may call every endpoint): 30 positive and 30 negative examples per operation.

The operations are driven with plain Hypothesis ``@given`` over ``operation.as_strategy()``:
schemathesis' lazy ``from_fixture`` loader fails under pytest 9 (it sets ``_nodeid``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency")

from fastapi.routing import APIRoute  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from fedaiot.serving.settings import RateLimit  # noqa: E402
from tests.serving_support import LiveServer, auth, make_keys, make_registry, settings_for  # noqa: E402

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Any]]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    keys = make_keys(root / "keys")
    make_registry(root / "registry", keys.private)
    limits = {"admin": RateLimit(per_second=10_000, burst=10_000)}
    # Negative cases break the Authorization header too: each of those is a refused call.
    lenient = RateLimit(per_second=10_000, burst=10_000)
    server = LiveServer(
        settings_for(
            root / "registry", keys, rate_limits=limits, unauthenticated_limit=lenient, docs=True
        )
    )
    yield server, auth(keys, "admin", "schemathesis")
    server.stop()


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_server_errors(fuzz_target: tuple[LiveServer, Any], mode: GenerationMode) -> None:
    server, headers = fuzz_target
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every endpoint, /healthz and /metrics included.
    routes = [r for r in server.app.routes if isinstance(r, APIRoute) and r.include_in_schema]
    assert len(operations) == sum(len(r.methods) for r in routes) >= 8
    calls, fuzzed = 0, 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: Any) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=10)

        try:
            fuzz()
            fuzzed += 1
        except Unsatisfiable:  # negative mode: an operation without inputs has none to break
            assert mode is GenerationMode.NEGATIVE
    # Negative data exists for predict, promote and audit (body, path, query) at least.
    assert fuzzed >= (len(operations) if mode is GenerationMode.POSITIVE else 3)
    assert calls >= fuzzed
