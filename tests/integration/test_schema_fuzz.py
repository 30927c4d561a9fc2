"""Property-based fuzzing of every operation in the live server's ``/openapi.json`` with schemathesis (v4).

The schemathesis engine (what ``schemathesis run`` drives) runs its coverage, fuzzing and stateful phases
against a real ``corral serve`` process, authenticated as a fresh account, with valid (positive) and invalid
(negative) requests. For every response these checks must hold:

* ``not_a_server_error``: no 5xx;
* ``status_code_conformance``: the status is one the operation documents;
* ``content_type_conformance``: the ``Content-Type`` is one documented for that status;
* ``response_schema_conformance``: the body matches the documented schema;
* ``response_headers_conformance``: documented response headers are present and well-formed;
* ``negative_data_rejection``: a request that violates the schema is answered with a 4xx;
* ``use_after_free`` / ``ensure_resource_availability`` (stateful phase): a deleted resource is gone, a
  created one can be fetched.

The run is reproducible: fixed seed, derandomized Hypothesis, no example database, and one worker (with two,
the interleaving of operations changes what the server holds, hence which statuses come back). Two runs
send the same requests and see the same answers. ``max-examples`` bounds the fuzzing phase. No ``max-time``
is set on purpose: with one, the v4 engine keeps re-running the fuzzing phase until the time is spent,
which is neither bounded by the examples nor reproducible. The whole file takes about 30-40 s on 2 cores.

(The pytest integration, ``schemathesis.pytest.from_fixture``, cannot load a schema from a fixture under
pytest 9 with schemathesis 4.32: it sets ``request.node._nodeid``, which pytest 9 no longer has. Driving the
engine directly also runs the stateful phase, which chains create, get, update and delete on real IDs.)

``test_the_fuzz_run_can_fail`` runs the same machinery against a copy of the schema with one deliberate
mismatch per check, so a toothless configuration (checks disabled, auth not sent, nothing generated) fails.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.engine import Status, StopReason, events, from_schema
from schemathesis.generation import GenerationMode

from tests.support import Account, Server, node_server, signup
from tests.vmtools import public_key

SEED = 20260228
MAX_EXAMPLES = 100  # per operation, fuzzing phase; the coverage and stateful phases are bounded on their own
STATE_PATHS = r"/(hibernate|resume|fork|snapshots|checkpoints|rollback)"
STATE_EXAMPLES = 10
PROXY_PATHS = r"/proxy/"

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "use_after_free",
    "ensure_resource_availability",
)


def _cursor(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


# Cursors shaped like the server's own (base64 of [version, sort, order, [key type, key], id]) with edge-case
# keys: random strings never decode, so without these the fuzzer would only ever reach the "malformed" branch.
EDGE_KEYS = (
    ["t", "2026-02-28T12:00:00+00:00"],
    ["t", "0001-01-01T00:00:00+14:00"],
    ["t", "9999-12-31T23:59:59-14:00"],
    ["s", ""],
    ["i", 0],
)
CURSORS = [
    _cursor([1, sort, order, key, "x_0"])
    for sort, order, key in itertools.product(
        ("created_at", "name", "host", "timestamp"), ("asc", "desc"), EDGE_KEYS
    )
]

# The schema types these fields as plain strings; the server also checks their shape (a secret name, an env
# var name, a hostname...). Valid values, drawn half of the time, let positive requests get past validation
# to creation, so the stateful phase can chain on real IDs (create, get, patch, delete).
DICTIONARIES = {
    "cursors": CURSORS,
    "names": ["github-main", "npm_token", "Rule.1", "a"],
    "env-vars": ["GITHUB_TOKEN", "NPM_TOKEN", "A1", "X"],
    "hosts": ["api.github.com", "*.github.com", "*", "example.org"],
    "cidrs": ["10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32"],
    "emails": ["alice@example.com", "bob@example.org"],
    "env-keys": ["NODE_ENV", "FOO", "_X1"],
    "public-keys": [public_key()],
    "commands": ["true", "echo hi", "exit 3"],
}
BINDINGS = {
    "body.name": "names",
    "body.env_var": "env-vars",
    "body.hosts[*]": "hosts",
    "body.host": "hosts",
    "body.cidr": "cidrs",
    "body.email": "emails",
    "path.key": "env-keys",
    "query.cursor": "cursors",
    "body.public_key": "public-keys",
    "body.command": "commands",
}

# Operations that take no parameters and no body: there is nothing to make invalid.
NO_INPUT = {
    "GET /healthz",
    "GET /readyz",
    "GET /v1/users/me",
    "GET /v1/egress/policy",
    "POST /v1/auth/device/code",
}


def fuzz_config(server: Server, token: str, *, max_examples: int = MAX_EXAMPLES) -> dict[str, Any]:
    """The run, as ``schemathesis.toml`` would spell it (validated by ``schemathesis.Config.from_dict``)."""
    return {
        "seed": SEED,
        "workers": 1,  # see the module docstring: reproducible
        "continue-on-failure": True,
        "request-timeout": 30,
        "base-url": server.url,
        "headers": {"Authorization": f"Bearer {token}"},
        "suppress-health-check": ["all"],
        "generation": {
            "mode": "all",  # positive and negative
            "max-examples": max_examples,
            "deterministic": True,  # Hypothesis derandomize=True (deadline is always None under the engine)
            "database": "none",
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": True, "max-steps": 10},
        },
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        # operations that capture or restore a sandbox take 0.1-1 s each (a fork of 16 children, more):
        # fewer fuzzing examples for them; the coverage and stateful phases still reach every one
        "operations": [
            {"include-path-regex": STATE_PATHS, "generation": {"max-examples": STATE_EXAMPLES}},
            # the guest port proxy answers 502 when nothing listens on the port inside the VM (the fuzzer
            # starts no server in its VMs), 504 when the guest does not answer: documented, not server errors
            {
                "include-path-regex": PROXY_PATHS,
                "checks": {
                    "not_a_server_error": {"expected-statuses": ["1xx", "2xx", "3xx", "4xx", "502", "504"]}
                },
            },
        ],
        "dictionaries": {name: {"values": values} for name, values in DICTIONARIES.items()},
        "parameters": {key: {"dictionary": name, "probability": 0.5} for key, name in BINDINGS.items()},
    }


@dataclass(frozen=True)
class FuzzFailure:
    operation: str
    check: str
    text: str


@dataclass
class Report:
    """What the engine did: which operations it sent, in which modes, what answered, and what failed."""

    modes: dict[str, set[GenerationMode]] = field(default_factory=lambda: defaultdict(set))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    checks_run: Counter[str] = field(default_factory=Counter)
    failures: list[FuzzFailure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_reason: StopReason | None = None

    def describe_failures(self) -> str:
        return f"{len(self.failures)} distinct failure(s):\n\n" + "\n\n".join(
            f"{f.operation}: {f.check}: {f.text}" for f in self.failures
        )


def run_fuzz(schema: Any) -> Report:
    report = Report()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record_scenario(report, event)
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            report.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            report.stop_reason = event.stop_reason
            report.failures.extend(
                FuzzFailure(f.operation or "run", "after_run", f"{f.title}\n{f.message}")
                for f in event.failures
            )
    return report


def _record_scenario(report: Report, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    if event.status == Status.ERROR:
        report.errors.append(f"[{event.phase.value}] {recorder.label}: scenario errored")
    seen = {(f.operation, f.check) for f in report.failures}
    for case_id, node in recorder.cases.items():
        case = node.value
        label = case.operation.label
        if case.meta is not None:
            report.modes[label].add(case.meta.generation.mode)
        interaction = recorder.interactions.get(case_id)
        if interaction is not None and interaction.response is not None:
            report.statuses[label][interaction.response.status_code] += 1
        for check in recorder.checks.get(case_id, []):
            report.checks_run[check.name] += 1
            if check.status != Status.FAILURE or check.failure_info is None:
                continue
            if (label, check.name) in seen:  # the first example of each check failing on each operation
                continue
            seen.add((label, check.name))
            failure = check.failure_info.failure
            report.failures.append(
                FuzzFailure(
                    label,
                    check.name,
                    f"[{event.phase.value}] {failure.title}\n{failure.message}\n"
                    f"reproduce with: {check.failure_info.code_sample}",
                )
            )


def load_spec(server: Server) -> dict[str, Any]:
    resp = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert resp.status_code == 200, resp.text
    spec: dict[str, Any] = resp.json()
    return spec


def without_idempotency_keys(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without the optional ``Idempotency-Key`` header. The fuzzer sends the few values it generates
    again and again, and a key sent again replays the first answer by design (a resource the run may have
    deleted since), which the stateful checks would take for a create that did not happen. The header has its
    own tests (tests/integration/test_idempotency.py)."""
    spec = copy.deepcopy(spec)
    for item in spec["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and "parameters" in op:
                op["parameters"] = [p for p in op["parameters"] if p.get("name") != "Idempotency-Key"]
    return spec


def operation_labels(spec: dict[str, Any]) -> set[str]:
    return {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with sandboxes: VM operations are fuzzed against real ones (made with the test key)."""
    # room for every fork the fuzzer asks (16 children at a time): the node's admission (503 node_full) is
    # tested in test_admission.py and tests/sandbox/test_capacity.py, not here
    with node_server(
        tmp_path_factory.mktemp("fuzz"),
        CORRAL_WARM_POOL_SIZE="1",
        CORRAL_OVERCOMMIT_VCPUS="100",
        CORRAL_OVERCOMMIT_MEM="100",
        CORRAL_OVERCOMMIT_DISK="100",
    ) as srv:
        yield srv


@pytest.fixture
def fuzz_account(fuzz_server: Server) -> Iterator[Account]:
    acct = signup(fuzz_server)
    yield acct
    acct.client.close()


def test_every_operation_conforms_to_the_schema(fuzz_server: Server, fuzz_account: Account) -> None:
    server, account = fuzz_server, fuzz_account
    expected = operation_labels(load_spec(server))
    config = schemathesis.Config.from_dict(fuzz_config(server, account.token))
    # The live server's description, as a client sees it, but for the Idempotency-Key header
    schema = schemathesis.openapi.from_dict(without_idempotency_keys(load_spec(server)), config=config)

    report = run_fuzz(schema)

    assert report.stop_reason == StopReason.COMPLETED, f"run stopped early: {report.stop_reason}"
    if report.errors:
        pytest.fail("schemathesis could not test everything:\n" + "\n".join(report.errors), pytrace=False)
    if report.failures:
        pytest.fail(report.describe_failures(), pytrace=False)
    # The run really covered the API: every operation got valid requests, every one that takes input got
    # invalid ones, every check ran, the bearer token was sent (the caller's own account answers 200, not
    # 401), and resources were really created, so the stateful phase worked on real IDs.
    assert set(report.modes) == expected
    for label in expected:
        assert GenerationMode.POSITIVE in report.modes[label], label
    for label in expected - NO_INPUT:
        assert GenerationMode.NEGATIVE in report.modes[label], label
    for name in CHECKS:
        assert report.checks_run[name] > 0, f"check {name} never ran"
    assert report.statuses["GET /v1/users/me"][200] > 0, report.statuses["GET /v1/users/me"]
    for label, created in (
        ("POST /v1/secrets", 201),
        ("POST /v1/egress/rules", 201),
        ("PUT /v1/env/{key}", 200),
        ("POST /v1/vms", 201),
        ("POST /v1/vms/{vm_id}/exec", 200),
    ):
        assert report.statuses[label][created] > 0, (label, report.statuses[label])
    for label in ("DELETE /v1/secrets/{secret_id}", "DELETE /v1/egress/rules/{rule_id}"):
        assert report.statuses[label][204] > 0, (label, report.statuses[label])


def test_the_fuzz_run_can_fail(fuzz_server: Server, fuzz_account: Account) -> None:
    server, account = fuzz_server, fuzz_account
    """The same run against a schema that disagrees with the server reports each kind of mismatch."""
    spec = copy.deepcopy(load_spec(server))
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    # GET /v1/users/me: the body no longer matches, email_verified is documented as a string
    schemas["UserOut"]["properties"]["email_verified"] = {"type": "string"}
    # GET /v1/env/{key}: 404, which an unknown key answers, is no longer documented
    del paths["/v1/env/{key}"]["get"]["responses"]["404"]
    # PUT /v1/egress/policy: a required response header the server never sends
    paths["/v1/egress/policy"]["put"]["responses"]["200"]["headers"] = {
        "X-Never-Sent": {"required": True, "schema": {"type": "string"}}
    }
    # GET /v1/egress/policy: documented as XML, answered as JSON
    ok = paths["/v1/egress/policy"]["get"]["responses"]["200"]
    ok["content"] = {"application/xml": ok["content"]["application/json"]}
    # GET /v1/env: limit documented as at most 5, so limit=6..200 is invalid data the server accepts
    for param in paths["/v1/env"]["get"]["parameters"]:
        if param["name"] == "limit":
            param["schema"] = {"type": "integer", "minimum": 1, "maximum": 5}
    config = schemathesis.Config.from_dict(fuzz_config(server, account.token, max_examples=10))
    schema = schemathesis.openapi.from_dict(spec, config=config).include(
        path_regex=r"^/v1/(users/me|env|env/\{key\}|egress/policy)$"
    )

    report = run_fuzz(schema)

    assert report.stop_reason == StopReason.COMPLETED
    assert {(f.operation, f.check) for f in report.failures} >= {
        ("GET /v1/users/me", "response_schema_conformance"),
        ("GET /v1/env/{key}", "status_code_conformance"),
        ("PUT /v1/egress/policy", "response_headers_conformance"),
        ("GET /v1/egress/policy", "content_type_conformance"),
        ("GET /v1/env", "negative_data_rejection"),
    }, report.describe_failures()
