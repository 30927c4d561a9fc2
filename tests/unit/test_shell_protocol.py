"""The shell WebSocket's protocol: the text written to bash, the marker scanner, the request parser."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.api.routers.access import _shell_request
from corral.domain.errors import ValidationFailed
from corral.services.shell import MarkerScanner, wrap


def scan(chunks: list[bytes], nonce: str) -> tuple[bytes, bytes | None]:
    scanner = MarkerScanner(nonce)
    out = b"".join(scanner.feed(chunk) for chunk in chunks)
    if scanner.found is None:
        out += scanner.rest()
    return out, scanner.found


@given(st.binary(max_size=200).filter(lambda b: b"\x1e" not in b), st.integers(1, 40), st.integers(0, 255))
def test_scanner_finds_the_marker_across_any_split(output: bytes, step: int, status: int) -> None:
    stream = output + f"\x1eabc123 {status}\x1e".encode() + b"after"
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    out, found = scan(chunks, "abc123")
    assert out == output
    assert found == str(status).encode()


def test_scanner_passes_lookalikes_and_holds_back_only_a_possible_start() -> None:
    scanner = MarkerScanner("abc123")
    assert scanner.feed(b"x\x1eabc") == b"x"  # could be the marker: held back
    assert scanner.feed(b"9 nope") == b"\x1eabc9 nope"  # it was not
    assert scanner.found is None
    out, found = scan([b"no marker at all \x1eab"], "abc123")
    assert (out, found) == (b"no marker at all \x1eab", None)


def run_in_bash(command: str) -> tuple[bytes, bytes]:
    nonce = "0123456789abcdef"
    done = subprocess.run(
        ["bash", "--noprofile", "--norc"], input=wrap(command, nonce), capture_output=True, timeout=10
    )
    return done.stdout, done.stderr


@pytest.mark.parametrize(
    ("command", "stdout", "status"),
    [
        ("echo hi", b"hi\n", 0),
        ("(exit 7)", b"", 7),
        ('printf \'%s\' "it\'s \\"quoted\\""', b'it\'s "quoted"', 0),
        ("cat <<'EOF'\nhere\nEOF", b"here\n", 0),
        ("cat", b"", 0),  # stdin is /dev/null, not the protocol
        ("echo 'line1\nline2'", b"line1\nline2\n", 0),
    ],
)
def test_wrapped_command_runs_verbatim_in_a_real_bash(command: str, stdout: bytes, status: int) -> None:
    out, err = run_in_bash(command)
    got, found = scan([out], "0123456789abcdef")
    assert got == stdout
    assert found == str(status).encode()
    err_out, err_found = scan([err], "0123456789abcdef")
    assert (err_out, err_found) == (b"", b"")


def test_state_carries_over_between_wrapped_commands() -> None:
    nonce = "feedbeef"
    script = wrap("cd /tmp; X=41", nonce) + wrap("echo $((X+1)) $PWD", nonce)
    done = subprocess.run(["bash", "--noprofile", "--norc"], input=script, capture_output=True, timeout=10)
    first = MarkerScanner(nonce)
    assert first.feed(done.stdout) == b""
    rest = done.stdout.split(b"\x1e", 2)[2]
    assert scan([rest], nonce) == (b"42 /tmp\n", b"0")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ls -la", ("ls -la", 60.0)),
        ('{"command": "pwd"}', ("pwd", 60.0)),
        ('{"command": "pwd", "timeout": 2.5}', ("pwd", 2.5)),
        ('{"type": "exec", "command": "id"}', ("id", 60.0)),
    ],
)
def test_shell_requests(text: str, expected: tuple[str, float]) -> None:
    assert _shell_request(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '{"command": 5}',
        '{"command": "x", "timeout": 0}',
        '{"command": "x", "timeout": true}',
        '{"command": "x", "timeout": 99999}',
        "{not json",
        '{"command": "a\\u0000b"}',
        "{]",
    ],
)
def test_bad_shell_requests(text: str) -> None:
    with pytest.raises(ValidationFailed):
        _shell_request(text)
