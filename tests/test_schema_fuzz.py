"""Schemathesis against the app's own /openapi.json: every route, admin routes included.

Each operation is fuzzed in-process (ASGI) with positive and negative data, through the explicit
examples, boundary-value ("coverage") and random ("fuzzing") phases, and every answer must:

- not be a 5xx (`not_a_server_error`);
- carry a status code the operation declares (`status_code_conformance`);
- have the declared content type and match the declared JSON schema (`content_type_conformance`,
  `response_schema_conformance`);
- refuse data that violates the schema with a 4xx (`negative_data_rejection`).

Bounded and reproducible: a fixed seed (`PRISM_FUZZ_SEED`), no example database, nothing written
to the repository, `PRISM_FUZZ_EXAMPLES` (default 300) random examples per operation; the run
prints how many cases each operation got and a digest of everything sent (same seed, same
digest). A longer run, or another seed:

    PRISM_FUZZ_EXAMPLES=3000 PRISM_FUZZ_SEED=7 .venv/bin/python -m pytest tests/test_schema_fuzz.py -q

The app serves a home of its own (build_serving_home gives a fresh one), so PUT / DELETE /
activate / retrain / events change nothing another test reads. Admin routes get the Bearer token
through the schemathesis config headers (auth failures are tested by hand in test_api.py).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
import hypothesis  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
# Imported at collection, not lazily by the first test: pytest rewrites a plugin's modules as they
# import, and CPython 3.11's compile() can raise "AST constructor recursion depth mismatch" when it
# runs while other threads (apps and loaders of earlier tests) are alive (python/cpython#106905).
import schemathesis.specs.openapi.schemas  # noqa: E402,F401
from schemathesis.generation.feedback import FeedbackSources  # noqa: E402,F401
from schemathesis.pytest import _test_builder  # noqa: E402,F401
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "fuzz-admin-token"
SEED = int(os.environ.get("PRISM_FUZZ_SEED", "20240607"))
EXAMPLES = int(os.environ.get("PRISM_FUZZ_EXAMPLES", "300"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
HYPOTHESIS = hypothesis.settings(
    max_examples=EXAMPLES, database=None, deadline=None, print_blob=False, suppress_health_check=list(HealthCheck),
)

# Every route of the v1 contract (docs/design.md, "HTTP contract"); a new route must be added here.
OPERATIONS = {
    "GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/models", "GET /v1/facets",
    "GET /v1/search", "POST /v1/search", "POST /v1/search/image",
    "GET /v1/products/{product_id}", "PUT /v1/products/{product_id}", "PATCH /v1/products/{product_id}",
    "DELETE /v1/products/{product_id}",
    "GET /v1/products/{product_id}/image", "GET /v1/products/{product_id}/images/{position}",
    "POST /v1/events", "POST /v1/models/{version}/activate", "GET /v1/retrain", "POST /v1/retrain",
    "POST /v1/models/{version}/canary", "DELETE /v1/models/{version}/canary",
}

CASES: Counter = Counter()  # (operation, phase, mode) -> cases sent
STATUSES: Counter = Counter()  # (operation, status) -> answers
SENT = hashlib.sha256()  # every case in order


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home(tmp_path_factory):
    """Hypothesis caches constants under ./.hypothesis; keep that out of the repository."""
    from hypothesis import configuration

    configuration.set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    configuration.set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def fuzz_settings(build_serving_home):
    return build_serving_home("fuzz-home", admin_token=TOKEN)


@pytest.fixture
def fuzz_schema(fuzz_settings):
    """A fresh app per test over the module's home: schemathesis' pytest plugin ends every ASGI
    lifespan it started when a test item tears down, and an app's lifespan runs once."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "cache": {"enabled": False},
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_settings), config=config)


def _send(case):
    phase = case.meta.phase.name.value if case.meta else "fuzzing"
    mode = case.meta.generation.mode.value if case.meta else "?"
    CASES[(case.operation.label, phase, mode)] += 1
    body = case.body if isinstance(case.body, (str, bytes, int, float, bool, list, dict, type(None))) else "<none>"
    SENT.update(repr((case.method, case.path, case.path_parameters, case.query, case.headers, body)).encode())
    response = case.call()
    STATUSES[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def _operation_test(schema, operation):
    """The Hypothesis test `@schema.parametrize()` builds for one operation (examples, coverage and
    fuzzing phases). Built here, per operation, because schemathesis' fixture-based lazy schema
    does not run under pytest 9.2 (it writes `Node._nodeid`)."""
    try:
        from schemathesis.generation.feedback import FeedbackSources
        from schemathesis.pytest._test_builder import build_operation_test
    except ImportError:  # that private API moved: fuzz with the public strategy alone
        modes = list(schemathesis.GenerationMode)
        strategy = hypothesis.strategies.one_of([operation.as_strategy(generation_mode=m) for m in modes])
        return hypothesis.seed(SEED)(HYPOTHESIS(hypothesis.given(strategy)(_send)))
    return build_operation_test(
        config=schema.config, operation=operation, test_func=_send, given_kwargs={},
        feedback=FeedbackSources(), explicit_settings=HYPOTHESIS,
    )


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_every_operation_answers_within_its_schema(fuzz_schema, label):
    """No 5xx, only declared statuses, declared content types and bodies, schema violations refused."""
    operation = fuzz_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in /openapi.json"
    _operation_test(fuzz_schema, operation)()
    assert any(key[0] == label for key in CASES), f"no case was generated for {label}"


def test_every_route_was_fuzzed(fuzz_schema, capsys, request):
    """The spec lists exactly the contract's routes, and each got positive and negative cases.
    Prints the case counts (and answers by status) per operation."""
    labels = {result.ok().label for result in fuzz_schema.get_all_operations()}
    assert labels == OPERATIONS
    if not CASES:
        pytest.skip("the fuzz test did not run in this session")
    per_op: Counter = Counter()
    phases: Counter = Counter()
    modes: dict[str, set] = {}
    for (label, phase, mode), n in CASES.items():
        per_op[label] += n
        phases[phase] += n
        modes.setdefault(label, set()).add(mode)
    total = sum(per_op.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(per_op)} operations "
              f"({', '.join(f'{p} {n}' for p, n in sorted(phases.items()))}; PRISM_FUZZ_EXAMPLES={EXAMPLES}, "
              f"seed {SEED}, cases sha256 {SENT.hexdigest()[:16]})")
        for label in sorted(per_op):
            statuses = sorted((status, n) for (op, status), n in STATUSES.items() if op == label)
            print(f"  {per_op[label]:5d}  {label}  ({', '.join(sorted(modes[label]))}): "
                  + " ".join(f"{status}x{n}" for status, n in statuses))
    request.node.user_properties.append(("schemathesis_cases", total))
    if set(per_op) == OPERATIONS:  # the whole file ran, not a -k selection
        assert all(modes[label] == {"positive", "negative"} for label in OPERATIONS), modes
        assert all(status < 500 for (_, status) in STATUSES)
