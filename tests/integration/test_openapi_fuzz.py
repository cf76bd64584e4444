"""schemathesis against the gateway's own OpenAPI schema (fake-engine mesh): whatever
a client sends, valid for the schema or not, the gateway never answers 5xx, and every
refusal is an OpenAI error object.

Each operation gets ``CASES_PER_MODE`` schema-valid and as many schema-violating
cases (≥ 500 per operation with a body or parameters); the figures are printed
(`-s`) and recorded in docs/reliability.md. The API has no OpenAPI links (no resource
one call creates and another reads), so schemathesis's stateful mode has nothing to
chain; every operation is fuzzed on its own.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
#: Per operation and mode (schema-valid, schema-violating); KVMESH_FUZZ_CASES raises it.
CASES_PER_MODE = int(os.environ.get("KVMESH_FUZZ_CASES", "250"))
#: Same cases on every run (CI stays deterministic); KVMESH_FUZZ_EXPLORE=1 draws new ones.
DERANDOMIZE = os.environ.get("KVMESH_FUZZ_EXPLORE") != "1"
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def fuzz_mesh(model_dir: Path) -> Iterator[Mesh]:
    """Instant fake tokens and a 512-token context: a case asking for a million tokens
    costs milliseconds, so hundreds of cases per operation fit in CI."""
    with running_mesh("kvm-fz-") as mesh:
        mesh.router = start_router(mesh)
        mesh.workers = [mesh.start_worker("w0", "--max-model-len", "512",
                                          env={"KVMESH_WORKER_FAKE_TOKEN_DELAY_S": "0"})]
        mesh.start_gateway()
        yield mesh


def _is_openai_error(body: object) -> bool:
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    error = body["error"]
    return (isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)
            and isinstance(error["message"], str) and bool(error["message"]))


def test_no_server_errors(fuzz_mesh: Mesh) -> None:
    schema = schemathesis.openapi.from_url(fuzz_mesh.http.removesuffix("/v1") + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    tested = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings",
            "GET /v1/models"} <= tested
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    for operation in operations:
        for mode in MODES:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=CASES_PER_MODE, deadline=None, database=None,
                      derandomize=DERANDOMIZE,
                      suppress_health_check=list(HealthCheck),
                      phases=[Phase.explicit, Phase.generate])  # report, don't shrink
            def call(case: schemathesis.Case) -> None:
                # Random model names only reach the 404; half the cases use the real one
                # so sampling fields, tools and constraints reach the pipeline.
                if (isinstance(case.body, dict) and "model" in case.body
                        and hash(repr(case.body)) % 2):
                    case.body["model"] = MODEL
                response = case.call(timeout=60)
                statuses[f"{case.method.upper()} {case.path}"][response.status_code] += 1
                context = (f"{case.method} {case.formatted_path} -> {response.status_code}: "
                           f"{response.text[:500]}\nbody: {case.body!r}")
                assert response.status_code < 500, context
                if response.status_code >= 400:
                    assert _is_openai_error(response.json()), context

            try:
                call()
            except Unsatisfiable:
                # No invalid input exists for an operation without parameters (GET /health).
                assert mode == schemathesis.GenerationMode.NEGATIVE
    for name, counts in sorted(statuses.items()):
        print(f"{name}: {sum(counts.values())} cases, statuses {dict(sorted(counts.items()))}")
    print(f"total: {sum(sum(c.values()) for c in statuses.values())} cases, 0 5xx")
    # Every operation with input got its hundreds of cases (hypothesis stops early
    # only where the input space is smaller, e.g. no parameters at all).
    for name in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings"):
        assert sum(statuses[name].values()) >= 2 * CASES_PER_MODE * 0.95, statuses[name]
    # Both accepted and rejected requests were exercised, on the generation endpoints too.
    chat = statuses["POST /v1/chat/completions"]
    assert chat[200] > 0 and sum(v for k, v in chat.items() if 400 <= k < 500) > 0
