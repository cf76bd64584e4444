"""schemathesis against the gateway's own OpenAPI schema (fake-engine mesh): whatever
a client sends, valid for the schema or not, the gateway never answers 5xx."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from .conftest import Mesh

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
MAX_EXAMPLES = 25  # per operation and mode: bounded, a minute or two on 2 busy cores


def test_no_server_errors(fake_mesh: Mesh) -> None:
    schema = schemathesis.openapi.from_url(fake_mesh.http.removesuffix("/v1") + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    tested = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= tested
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck),
                      phases=[Phase.explicit, Phase.generate])  # report, don't shrink
            def call(case: schemathesis.Case) -> None:
                # Random model names only reach the 404; half the cases use the real one
                # so sampling fields, tools and constraints reach the pipeline.
                if (isinstance(case.body, dict) and "model" in case.body
                        and hash(repr(case.body)) % 2):
                    case.body["model"] = MODEL
                response = case.call(timeout=60)
                statuses[response.status_code] += 1
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:500]}\nbody: {case.body!r}")

            try:
                call()
            except Unsatisfiable:
                # No invalid input exists for an operation without parameters (GET /health).
                assert mode == schemathesis.GenerationMode.NEGATIVE
    # Both accepted and rejected requests were exercised.
    assert statuses[200] > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0
