"""Secrets from inside real sandboxes: the exec environment holds the placeholder (``proxy_value``), the
egress proxy swaps it for the value in HTTPS headers to the hosts the secret is scoped to (the sandbox trusts
the interception CA as it is), everything else carries the placeholder unchanged, and the value is nowhere a
sandbox or an API read could see it. The fake internet (tests/fakenet.py) is the upstream: its log shows what
really arrived."""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import time
from typing import Any

import httpx

from tests import vmtools
from tests.fakenet import FakeInternet
from tests.support import Account

FAKE_CA = "/tmp/fake-ca.pem"  # the fake internet's CA, for passed-through (not intercepted) HTTPS
BOTH_CAS = "/tmp/both-cas.pem"  # the sandbox's trust store plus the fake CA: either way of HTTPS works
NO_CAPATH = "/tmp/no-capath"  # an empty CA directory: curl reads /etc/ssl/certs as its CApath otherwise
RELOAD_LIMIT = 1.5  # seconds: the proxy reloads policy and secrets about twice a second ("within ~1 s")


# ---- helpers ----------------------------------------------------------------------------------------------


def _value() -> str:
    return f"s3cr3t-{secrets.token_hex(12)}"


def _allow(c: httpx.Client, *hosts: str) -> None:
    for host in hosts:
        resp = c.post("/v1/egress/rules", json={"host": host})
        assert resp.status_code == 201, resp.text


def _secret(c: httpx.Client, **body: Any) -> dict[str, Any]:
    resp = c.post("/v1/secrets", json=body)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    assert out["proxy_value"] == f"CORRAL_PROXY_{body['name']}"
    return out


def _sh(c: httpx.Client, vm_id: str, command: str | list[str], **fields: Any) -> dict[str, Any]:
    return vmtools.run(c, vm_id, command, **fields)


def _prepare(c: httpx.Client, vm_id: str, internet: FakeInternet) -> None:
    """The fake internet's CA at FAKE_CA, and BOTH_CAS, in the sandbox."""
    up = c.post(
        f"/v1/vms/{vm_id}/files/upload", params={"path": FAKE_CA}, content=internet.ca_pem.read_bytes()
    )
    assert up.status_code in (200, 201, 204), up.text
    out = _sh(
        c, vm_id, f"cat /etc/ssl/certs/ca-certificates.crt {FAKE_CA} > {BOTH_CAS}; mkdir -p {NO_CAPATH}"
    )
    assert out["exit_code"] == 0, out


def _tag() -> str:
    return secrets.token_hex(4)


def _headers(event: dict[str, Any]) -> dict[str, str]:
    """A logged (or echoed) request's headers, names lower-cased."""
    return {str(name).lower(): str(value) for name, value in event["headers"]}


def _arrived(internet: FakeInternet, kind: str, path: str, since: int) -> dict[str, Any]:
    """The request for ``path`` that reached the fake internet (over ``kind``: http or https)."""
    return internet.wait_for(kind, {"path": path}, since=since, timeout=5)


def _basic_password(header: str) -> str:
    scheme, _, token = header.partition(" ")
    assert scheme.lower() == "basic", header
    return base64.b64decode(token).decode().partition(":")[2]


def _curl(url: str, *, headers: dict[str, str] | None = None, opts: str = "") -> str:
    """A curl command line; header values may use the shell's ``$VAR``."""
    hs = " ".join(f'-H "{name}: {value}"' for name, value in (headers or {}).items())
    return f"curl -sS -m 5 {opts} {hs} {shlex.quote(url)}"


# ---- tests ------------------------------------------------------------------------------------------------


def test_scoped_secret_is_injected_into_https_headers_to_its_host_only(
    owner: Account, internet: FakeInternet
) -> None:
    c = owner.client
    _allow(c, "api.secret.test", "allowed.test")
    value = _value()
    sec = _secret(c, name="api-key", secret=value, env_var="API_TOKEN", hosts=["api.secret.test"])
    placeholder = sec["proxy_value"]
    assert sec["hosts"] == ["api.secret.test"]
    assert value not in json.dumps(sec)
    vm = vmtools.create_ready(c)
    try:
        _prepare(c, vm["id"], internet)

        # the exec environment: the placeholder, never the value
        env = _sh(c, vm["id"], "printenv API_TOKEN; env")
        assert env["exit_code"] == 0, env
        assert env["stdout"].splitlines()[0] == placeholder
        assert value not in env["stdout"] + env["stderr"]

        # HTTPS to the scoped host, with the system trust store as it is (no --cacert): Bearer, a custom
        # header and HTTP Basic (base64 inside the header) all arrive with the real value
        t = _tag()
        mark = internet.mark()
        cmd = "; ".join(
            [
                _curl(
                    f"https://api.secret.test/bearer-{t}",
                    headers={"Authorization": "Bearer $API_TOKEN", "X-Api-Key": "$API_TOKEN"},
                ),
                "echo",
                _curl(f"https://api.secret.test/basic-{t}", opts='-u "user:$API_TOKEN"'),
                "echo",
            ]
        )
        out = _sh(c, vm["id"], cmd)
        assert out["exit_code"] == 0, out
        echoed = [json.loads(line) for line in out["stdout"].splitlines() if line.strip()]
        assert [e["path"] for e in echoed] == [f"/bearer-{t}", f"/basic-{t}"], out
        bearer = _arrived(internet, "https", f"/bearer-{t}", mark)
        for seen in (_headers(bearer), _headers(echoed[0])):
            assert seen["authorization"] == f"Bearer {value}", seen
            assert seen["x-api-key"] == value, seen
        assert bearer["addr"] == "198.18.1.3"
        assert bearer["sni"] == "api.secret.test"
        basic = _arrived(internet, "https", f"/basic-{t}", mark)
        for seen in (_headers(basic), _headers(echoed[1])):
            assert _basic_password(seen["authorization"]) == value, seen
        assert placeholder not in json.dumps(bearer) + json.dumps(basic)

        # python's urllib with its default context (the system store) works too
        py = (
            "import os, urllib.request\n"
            f"req = urllib.request.Request('https://api.secret.test/py-{t}', "
            "headers={'X-Api-Key': os.environ['API_TOKEN']})\n"
            "print(urllib.request.urlopen(req, timeout=5).status)\n"
        )
        out = _sh(c, vm["id"], ["python3", "-c", py])
        assert out["exit_code"] == 0, out
        assert out["stdout"].strip() == "200"
        assert _headers(_arrived(internet, "https", f"/py-{t}", mark))["x-api-key"] == value

        # the connection to the scoped host is intercepted: the fake internet's own CA alone does not verify
        # the certificate the sandbox gets
        out = _sh(
            c,
            vm["id"],
            _curl(f"https://api.secret.test/fake-ca-{t}", opts=f"--cacert {FAKE_CA} --capath {NO_CAPATH}"),
        )
        assert out["exit_code"] == 60, out  # curl: peer certificate cannot be authenticated

        # another allowed host is not in the secret's hosts: passed through untouched (its certificate is the
        # fake internet's, so curl needs --cacert there), the placeholder arrives as it was sent
        out = _sh(c, vm["id"], _curl(f"https://allowed.test/plain-ca-{t}"))
        assert out["exit_code"] == 60, out
        out = _sh(
            c,
            vm["id"],
            _curl(
                f"https://allowed.test/other-{t}",
                headers={"Authorization": "Bearer $API_TOKEN"},
                opts=f"--cacert {FAKE_CA}",
            )
            + "; "
            + _curl(f"https://allowed.test/other-basic-{t}", opts=f'--cacert {FAKE_CA} -u "user:$API_TOKEN"'),
        )
        assert out["exit_code"] == 0, out
        other = _headers(_arrived(internet, "https", f"/other-{t}", mark))
        assert other["authorization"] == f"Bearer {placeholder}"
        other_basic = _headers(_arrived(internet, "https", f"/other-basic-{t}", mark))
        assert _basic_password(other_basic["authorization"]) == placeholder

        # plain HTTP to the scoped host: never injected
        out = _sh(
            c,
            vm["id"],
            _curl(
                f"http://api.secret.test/http-{t}",
                headers={"Authorization": "Bearer $API_TOKEN", "X-Api-Key": "$API_TOKEN"},
            ),
        )
        assert out["exit_code"] == 0, out
        plain = _headers(_arrived(internet, "http", f"/http-{t}", mark))
        assert plain["authorization"] == f"Bearer {placeholder}"
        assert plain["x-api-key"] == placeholder

        # inside the intercepted connection, a request for another Host is refused, not sent with the value
        out = _sh(
            c,
            vm["id"],
            _curl(
                f"https://api.secret.test/smuggle-{t}",
                headers={"Host": "allowed.test", "X-Api-Key": "$API_TOKEN"},
                opts="-o /dev/null -w '%{http_code}'",
            ),
        )
        assert out["stdout"] == "421", out

        # the trust is in the system store itself, not only in the exec's *_CA_BUNDLE variables (an SSH
        # session has none of them), and survives update-ca-certificates
        no_vars = "env -u SSL_CERT_FILE -u CURL_CA_BUNDLE -u REQUESTS_CA_BUNDLE"
        out = _sh(
            c,
            vm["id"],
            f"{no_vars} {_curl(f'https://api.secret.test/novars-{t}', opts='-o /dev/null')} && "
            "update-ca-certificates >/dev/null 2>&1 && "
            f'{no_vars} python3 -c "import urllib.request; '
            f"print(urllib.request.urlopen('https://api.secret.test/updated-{t}', timeout=5).status)\"",
        )
        assert out["exit_code"] == 0, out
        assert out["stdout"].strip() == "200", out
        _arrived(internet, "https", f"/novars-{t}", mark)
        _arrived(internet, "https", f"/updated-{t}", mark)

        time.sleep(0.3)
        everything = json.dumps(internet.events_since(mark))
        assert f"smuggle-{t}" not in everything
        # the value went only to api.secret.test, over HTTPS
        for event in internet.events_since(mark):
            if value in json.dumps(event):
                assert (event["kind"], event["addr"]) == ("https", "198.18.1.3"), event
    finally:
        vmtools.destroy(c, vm["id"])


def test_wildcard_and_any_host_scoping(owner: Account, internet: FakeInternet) -> None:
    c = owner.client
    _allow(c, "api.secret.test", "allowed.test", "*.wild.test", "deep.a.wild.test")
    wild_value, suffix_value, any_value = _value(), _value(), _value()
    _secret(c, name="wild", secret=wild_value, env_var="WILD_TOKEN", hosts=["*.wild.test"])
    _secret(c, name="suffix", secret=suffix_value, env_var="SUFFIX_TOKEN", hosts=["*.secret.test"])
    vm = vmtools.create_ready(c)
    try:
        _prepare(c, vm["id"], internet)
        t = _tag()
        mark = internet.mark()
        both = {"X-Wild": "$WILD_TOKEN", "X-Suffix": "$SUFFIX_TOKEN"}
        out = _sh(
            c,
            vm["id"],
            "; ".join(
                [
                    _curl(f"https://api.secret.test/suffix-{t}", headers=both, opts="-o /dev/null"),
                    _curl(f"https://a.wild.test/wild-{t}", headers=both, opts="-o /dev/null"),
                    # a wildcard covers one label: deep.a.wild.test is passed through (the fake CA verifies it)
                    _curl(
                        f"https://deep.a.wild.test/deep-{t}",
                        headers=both,
                        opts=f"-o /dev/null --cacert {FAKE_CA}",
                    ),
                    _curl(
                        f"https://allowed.test/none-{t}",
                        headers=both,
                        opts=f"-o /dev/null --cacert {FAKE_CA}",
                    ),
                ]
            )
            + "; echo rc=$?",
        )
        assert out["stdout"].strip() == "rc=0", out
        assert not out["stderr"], out
        seen = _headers(_arrived(internet, "https", f"/suffix-{t}", mark))
        assert (seen["x-suffix"], seen["x-wild"]) == (suffix_value, "CORRAL_PROXY_wild")
        seen = _headers(_arrived(internet, "https", f"/wild-{t}", mark))
        assert (seen["x-suffix"], seen["x-wild"]) == ("CORRAL_PROXY_suffix", wild_value)
        for path in (f"/deep-{t}", f"/none-{t}"):
            seen = _headers(_arrived(internet, "https", path, mark))
            assert (seen["x-suffix"], seen["x-wild"]) == ("CORRAL_PROXY_suffix", "CORRAL_PROXY_wild"), path

        # no hosts given: ["*"], injected over HTTPS to any allowed host (now intercepted: no --cacert needed)
        sec = _secret(c, name="anyhost", secret=any_value, env_var="ANY_TOKEN")
        assert sec["hosts"] == ["*"]
        headers = {"X-Any": "$ANY_TOKEN"}
        deadline = time.monotonic() + RELOAD_LIMIT + 1
        while True:  # the proxy picks the new secret up within its reload interval
            probe = f"/probe-{_tag()}"
            _sh(
                c,
                vm["id"],
                _curl(f"https://allowed.test{probe}", headers=headers, opts=f"--cacert {BOTH_CAS}"),
            )
            if _headers(_arrived(internet, "https", probe, mark))["x-any"] == any_value:
                break
            assert time.monotonic() < deadline, "the new secret was not injected in time"
        out = _sh(
            c,
            vm["id"],
            "; ".join(
                _curl(f"https://{host}/any-{host}-{t}", headers=headers, opts="-o /dev/null")
                for host in ("allowed.test", "a.wild.test", "api.secret.test", "deep.a.wild.test")
            )
            + "; "
            + _curl(f"http://allowed.test/any-http-{t}", headers=headers, opts="-o /dev/null")
            + "; echo rc=$?",
        )
        assert out["stdout"].strip() == "rc=0", out
        assert not out["stderr"], out
        for host in ("allowed.test", "a.wild.test", "api.secret.test", "deep.a.wild.test"):
            assert _headers(_arrived(internet, "https", f"/any-{host}-{t}", mark))["x-any"] == any_value
        assert _headers(_arrived(internet, "http", f"/any-http-{t}", mark))["x-any"] == "CORRAL_PROXY_anyhost"

        # a host the secret covers but the policy does not allow gets nothing at all
        mark2 = internet.mark()
        out = _sh(c, vm["id"], _curl(f"https://evil.test/denied-{t}", headers=headers))
        assert out["exit_code"] != 0, out
        time.sleep(0.3)
        assert internet.events_since(mark2, "https") == []
        assert internet.events_since(mark2, "tls_error") == []
    finally:
        vmtools.destroy(c, vm["id"])


def test_secret_value_is_nowhere_in_the_sandbox_or_the_api(owner: Account, internet: FakeInternet) -> None:
    c = owner.client
    _allow(c, "api.secret.test")
    value = _value()
    created = c.post(
        "/v1/secrets",
        json={"name": "hidden", "secret": value, "env_var": "HIDDEN_TOKEN", "hosts": ["api.secret.test"]},
    )
    assert created.status_code == 201, created.text
    sec = created.json()
    patched = c.patch(f"/v1/secrets/{sec['id']}", json={"comment": "rotated monthly"})
    assert patched.status_code == 200, patched.text
    vm = vmtools.create_ready(c)
    try:
        # used once, so the proxy has it in hand
        mark = internet.mark()
        out = _sh(
            c,
            vm["id"],
            _curl("https://api.secret.test/use", headers={"X-Api-Key": "$HIDDEN_TOKEN"}, opts="-o /dev/null"),
        )
        assert out["exit_code"] == 0, out
        assert _headers(_arrived(internet, "https", "/use", mark))["x-api-key"] == value

        # every process's environment and command line, with a long-lived process of the exec among them
        procs = _sh(
            c,
            vm["id"],
            "sleep 30 >/dev/null 2>&1 & env; ps auxeww; "
            "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' '\\n' < $f; echo; done 2>/dev/null; "
            "kill %1",
        )
        text = procs["stdout"] + procs["stderr"]
        assert "HIDDEN_TOKEN=CORRAL_PROXY_hidden" in text, procs  # the scan did see the environments
        assert "sleep 30" in text, procs
        assert value not in text

        # files: the value is split over two variables so that only grep's own command line holds it whole
        half = len(value) // 2
        found = _sh(
            c,
            vm["id"],
            'grep -rlsF -e "$P1$P2" /etc /root /tmp /home /var /usr/local /opt /srv /.corral; echo rc=$?',
            env={"P1": value[:half], "P2": value[half:]},
        )
        assert found["stdout"].strip() in ("rc=1", "rc=2"), found  # 1: no match; 2: a directory is missing
        assert "/" not in found["stdout"], found

        # the API: create, patch, get, list (plain and filtered), the VM object and list, the audit trail
        reads = [
            created.text,
            patched.text,
            c.get(f"/v1/secrets/{sec['id']}").text,
            c.get("/v1/secrets").text,
            c.get("/v1/secrets", params={"name": "hidden"}).text,
            c.get(f"/v1/vms/{vm['id']}").text,
            c.get("/v1/vms").text,
            c.get("/v1/audit/egress").text,
        ]
        for body in reads:
            assert value not in body, body
        got = c.get(f"/v1/secrets/{sec['id']}").json()
        assert set(got) == {
            "id",
            "name",
            "env_var",
            "hosts",
            "proxy_value",
            "comment",
            "created_at",
            "updated_at",
        }
        assert got["proxy_value"] == "CORRAL_PROXY_hidden"
        listed = c.get("/v1/secrets").json()
        assert [s["id"] for s in listed["data"]] == [sec["id"]]
        assert "secret" not in listed["data"][0]
    finally:
        vmtools.destroy(c, vm["id"])


def test_patched_value_applies_at_once_and_deleted_secret_is_not_injected(
    owner: Account, internet: FakeInternet
) -> None:
    c = owner.client
    _allow(c, "api.secret.test")
    first, second = _value(), _value()
    sec = _secret(c, name="rotating", secret=first, env_var="ROT_TOKEN", hosts=["api.secret.test"])
    vm = vmtools.create_ready(c)
    try:
        _prepare(c, vm["id"], internet)
        mark = internet.mark()

        def probe() -> str:
            # the placeholder as the sandbox would have kept it (after DELETE, ROT_TOKEN is gone from exec)
            path = f"/rot-{_tag()}"
            out = _sh(
                c,
                vm["id"],
                _curl(
                    f"https://api.secret.test{path}",
                    headers={"X-Api-Key": sec["proxy_value"]},
                    opts=f"-o /dev/null --cacert {BOTH_CAS}",
                ),
            )
            assert out["exit_code"] == 0, out
            return _headers(_arrived(internet, "https", path, mark))["x-api-key"]

        env = _sh(c, vm["id"], "printenv ROT_TOKEN")
        assert env["stdout"].strip() == sec["proxy_value"], env
        assert probe() == first

        resp = c.patch(f"/v1/secrets/{sec['id']}", json={"secret": second})
        assert resp.status_code == 200, resp.text
        assert second not in resp.text
        assert first not in resp.text
        changed = time.monotonic()
        seen = [probe()]
        while seen[-1] != second and time.monotonic() - changed < RELOAD_LIMIT + 2:
            seen.append(probe())
        took = time.monotonic() - changed
        assert seen[-1] == second, seen
        assert set(seen) <= {first, second}, seen
        assert took < RELOAD_LIMIT, f"the new value took {took:.2f} s to apply"
        assert probe() == second  # and it stays

        resp = c.delete(f"/v1/secrets/{sec['id']}")
        assert resp.status_code == 204, resp.text
        gone = time.monotonic()
        seen = [probe()]
        while seen[-1] != "CORRAL_PROXY_rotating" and time.monotonic() - gone < RELOAD_LIMIT + 2:
            seen.append(probe())
        took = time.monotonic() - gone
        assert seen[-1] == "CORRAL_PROXY_rotating", seen
        assert took < RELOAD_LIMIT, f"the deleted secret was still injected {took:.2f} s later"
        assert probe() == "CORRAL_PROXY_rotating"

        # and the exec environment no longer has it
        env = _sh(c, vm["id"], "printenv ROT_TOKEN; echo rc=$?")
        assert env["stdout"].strip() == "rc=1", env
    finally:
        vmtools.destroy(c, vm["id"])
