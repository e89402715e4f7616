"""The OpenAPI schema against the fake-engine server: fuzzed requests never get a 5xx, and every response
conforms to the schema the routes declare."""

from __future__ import annotations

import pytest

from fake_api import auth, fake_api


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    with fake_api(tiny, tmp_path_factory.mktemp("fake-store")) as client:
        yield client


def test_openapi_fuzzing_no_5xx_and_schema_conformance(api):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(api.base + "/openapi.json")
    failures, cases = [], 0
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  derandomize=True)
        @given(case=op.as_strategy())
        def run(case):
            nonlocal cases
            cases += 1
            if isinstance(case.body, dict):
                case.body.pop("async", None)  # jobs would outlive the test
            response = case.call(headers=auth("delta"), timeout=120)
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # noqa: BLE001  (collect every failing operation)
                failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:300]}")
                raise

        try:
            run()
        except Exception:  # noqa: BLE001
            pass
    assert cases >= 80
    assert not failures, "\n".join(failures[:10])
