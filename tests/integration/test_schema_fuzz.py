"""Property-based fuzzing of every operation in the live server's ``/openapi.json`` with schemathesis (v4).

The schemathesis engine (what ``schemathesis run`` drives) runs its examples, coverage and fuzzing phases
against a real ``corral serve`` process, authenticated as a fresh account, with valid (positive) and invalid
(negative) requests. For every response these checks must hold:

* ``not_a_server_error``: no 5xx;
* ``status_code_conformance``: the status is one the operation documents;
* ``content_type_conformance``: the ``Content-Type`` is one documented for that status;
* ``response_schema_conformance``: the body matches the documented schema;
* ``response_headers_conformance``: documented response headers are present and well-formed;
* ``negative_data_rejection``: a request that violates the schema is answered with a 4xx.

Generation is deterministic (fixed seed, derandomized Hypothesis, no example database), so a failure
reproduces; ``max-examples`` bounds the fuzzing phase so the whole run stays well under 90 s on 2 cores.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck
from schemathesis.engine import Status, StopReason, events, from_schema
from schemathesis.generation import GenerationMode

from tests.support import Account, Server

SEED = 20260228
MAX_EXAMPLES = 25  # per operation and generation mode, for the fuzzing phase
MAX_TIME = 150  # seconds: a hard stop, far above the expected run time; reaching it fails the test

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
)
PHASES = ("examples", "coverage", "fuzzing")


def fuzz_config(server: Server, token: str) -> dict[str, Any]:
    """The run, as a ``schemathesis.toml`` would write it."""
    return {
        "seed": SEED,
        "max-time": MAX_TIME,
        "workers": 2,
        "continue-on-failure": True,
        "request-timeout": 30,
        "base-url": server.url,
        "headers": {"Authorization": f"Bearer {token}"},
        "suppress-health-check": ["all"],
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            "unique-inputs": True,
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    }


@dataclass
class Report:
    """What the engine did: which operations it tested, in which modes, and what failed."""

    operations: set[str] = field(default_factory=set)
    modes: dict[str, set[GenerationMode]] = field(default_factory=lambda: defaultdict(set))
    checks_run: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_reason: StopReason | None = None
    running_time: float = 0.0


def run_fuzz(schema: Any) -> Report:
    report = Report()
    seen_failures: set[tuple[str, str, str]] = set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            if event.status == Status.ERROR:
                report.errors.append(f"{recorder.label}: scenario errored")
            for case_id, node in recorder.cases.items():
                report.operations.add(node.value.operation.label)
                meta = node.value.meta
                if meta is not None:
                    report.modes[node.value.operation.label].add(meta.generation.mode)
                for check in recorder.checks.get(case_id, []):
                    report.checks_run[check.name] += 1
                    if check.status != Status.FAILURE or check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    key = (recorder.label, check.name, failure.title)
                    if key in seen_failures:
                        continue
                    seen_failures.add(key)
                    report.failures.append(
                        f"[{event.phase.value}] {recorder.label}: {check.name}: {failure.title}\n"
                        f"{failure.message}\n"
                        f"reproduce: {check.failure_info.code_sample}"
                    )
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            report.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            report.stop_reason = event.stop_reason
            report.running_time = event.running_time
            report.failures.extend(str(f) for f in event.failures)
    return report


def test_every_operation_conforms_to_the_schema(server: Server, account: Account) -> None:
    # Loaded from the live server, exactly as a client would see it.
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    expected = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}

    config = schemathesis.Config.from_dict(fuzz_config(server, account.token))
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    report = run_fuzz(schema)

    assert report.stop_reason == StopReason.COMPLETED, f"run stopped early: {report.stop_reason}"
    assert not report.errors, "schemathesis could not test everything:\n" + "\n".join(report.errors)
    assert not report.failures, f"{len(report.failures)} distinct failure(s):\n\n" + "\n\n".join(
        report.failures
    )
    # Guard against a run that silently tested nothing (e.g. a filter, or a schema that failed to load).
    assert report.operations == expected
    for label in expected:
        assert report.modes[label] >= {GenerationMode.POSITIVE}, label
    assert {label for label, modes in report.modes.items() if GenerationMode.NEGATIVE in modes}, report.modes
    for name in CHECKS:
        assert report.checks_run[name] > 0, f"check {name} never ran"
    _ = HealthCheck  # hypothesis is configured through the schemathesis config above
