"""The egress process as ``corral serve`` runs it: started inside the gateway namespace, restarted if it
dies, ended (by its PID) when the server stops, and killed by the kernel if the server dies first (so a
restarted server never finds an old one holding the ports).

The watchdog also probes the proxy and the resolver end to end from inside the gateway (its thread enters
the gateway's network namespace): a process that stops answering (stopped, deadlocked) is killed by its PID
and started again after ``FAILS_BEFORE_RESTART`` failed rounds; each restart is logged and counted. What the
probes found is the egress and resolver parts of ``/readyz``."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from corral.config import Settings
from corral.domain.readiness import Part
from corral.egress.hostns import HOST_NETNS_FD_ENV
from corral.egress.main import READY_FILE
from corral.egress.probe import ProbeResult, probe_proxy, probe_resolver

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
FAILS_BEFORE_RESTART = 3  # probe rounds without an answer before the process is killed and started again


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class EgressSupervisor:
    def __init__(self, settings: Settings, gateway_ns: str) -> None:
        self.settings = settings
        self.gateway_ns = gateway_ns
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watch = threading.Thread(target=self._watchdog, name="egress-watchdog", daemon=True)
        self.restarts = 0
        self._timeout = 30.0
        self._first = threading.Event()
        self._first_error: RuntimeError | None = None
        self._parts = {"egress": Part.down("starting"), "resolver": Part.down("starting")}
        self._silent_rounds = 0
        self._failed_starts = 0
        self._retry_at = 0.0

    def parts(self) -> dict[str, Part]:
        """The egress and resolver parts of readiness, as the last probe found them."""
        with self._lock:
            return dict(self._parts)

    def _set_parts(self, egress: Part, resolver: Part) -> None:
        with self._lock:
            self._parts = {"egress": egress, "resolver": resolver}

    @property
    def ready_file(self) -> Path:
        return self.settings.egress_dir / READY_FILE

    @property
    def log_file(self) -> Path:
        return self.settings.egress_dir / "egress.log"

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until it serves. It is spawned by the watchdog thread, which lives as
        long as the server: the kernel's parent-death signal fires when the spawning *thread* ends."""
        self._timeout = timeout
        self._watch.start()
        self._first.wait()
        if self._first_error is not None:
            raise self._first_error

    def _spawn(self, timeout: float) -> None:
        self.ready_file.unlink(missing_ok=True)
        # the host's network namespace (the server's main thread's), for the egress process's store calls
        host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        env = {**os.environ, **self._env(), HOST_NETNS_FD_ENV: str(host_ns)}
        try:
            with open(self.log_file, "ab") as out:
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.gateway_ns, sys.executable, "-m", "corral", "egress"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    env=env,
                    pass_fds=(host_ns,),
                    preexec_fn=_die_with_parent,
                )
        finally:
            os.close(host_ns)
        with self._lock:
            self.proc = proc
        end = time.monotonic() + timeout
        while not self.ready_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the egress process exited ({proc.returncode}): {self._tail()}")
            if time.monotonic() > end:
                self._end(proc)
                raise RuntimeError(f"the egress process did not get ready in {timeout:.0f} s: {self._tail()}")
            time.sleep(0.02)

    def _env(self) -> dict[str, str]:
        s = self.settings
        env = {
            "CORRAL_DATA_DIR": str(s.data_dir),
            "CORRAL_DATABASE_URL": s.database_url,
            "CORRAL_SECRET_KEY_FILE": str(s.secret_key_file),
            "CORRAL_GATEWAY_NETNS": s.gateway_netns,
            "CORRAL_SANDBOX_SUBNET": s.sandbox_subnet,
            "CORRAL_UPLINK": s.uplink,
            "CORRAL_UPLINK_SUBNET": s.uplink_subnet,
            "CORRAL_EGRESS_PROXY_PORT": str(s.egress_proxy_port),
            "CORRAL_EGRESS_DNS_PORT": str(s.egress_dns_port),
            "CORRAL_EGRESS_DENY_CIDRS": " ".join(s.egress_deny_cidrs),
            "CORRAL_EGRESS_READY_FILE": str(self.ready_file),
            "CORRAL_EGRESS_MAX_CONNS_PER_VM": str(s.egress_max_conns_per_vm),
            "CORRAL_EGRESS_MAX_CONNS_PER_OWNER": str(s.egress_max_conns_per_owner),
            "CORRAL_EGRESS_MAX_CONNS": str(s.egress_max_conns),
            "CORRAL_EGRESS_FIRST_BYTE_TIMEOUT_S": str(s.egress_first_byte_timeout_s),
        }
        if s.upstream_dns:
            env["CORRAL_UPSTREAM_DNS"] = " ".join(s.upstream_dns)
        if s.upstream_ca is not None:
            env["CORRAL_UPSTREAM_CA"] = str(s.upstream_ca)
        return env

    def _tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _watchdog(self) -> None:
        try:
            _enter_netns(self.gateway_ns)  # this thread only: the probes are made from the gateway
            self._spawn(self._timeout)
            self._probe()  # readiness is known before the server serves
        except (RuntimeError, OSError) as exc:
            self._first_error = exc if isinstance(exc, RuntimeError) else RuntimeError(str(exc))
            return
        finally:
            self._first.set()
        while not self._stop.wait(self.settings.egress_probe_interval_s):
            with self._lock:
                proc = self.proc
            if proc is None or self._stop.is_set() or time.monotonic() < self._retry_at:
                continue
            if proc.poll() is not None:
                self._restart(f"the egress process exited ({proc.returncode})")
            elif self._probe() >= FAILS_BEFORE_RESTART:
                parts = self.parts()
                why = "; ".join(p.detail or "" for p in parts.values() if p.state == "down")
                self._restart(f"the egress process (pid {proc.pid}) stopped answering: {why}")

    def _probe(self) -> int:
        """Probe both parts, record what was found; the number of rounds in a row without an answer."""
        timeout = self.settings.egress_probe_timeout_s
        proxy = probe_proxy(self.settings.egress_proxy_port, timeout)
        resolver = probe_resolver(self.settings.egress_dns_port, timeout)
        self._set_parts(_part(proxy), _part(resolver))
        self._silent_rounds = 0 if proxy.answered and resolver.answered else self._silent_rounds + 1
        return self._silent_rounds

    def _restart(self, why: str) -> None:
        with self._lock:
            proc = self.proc
        self.restarts += 1
        log.error("%s; killing it and starting it again (restart %d)", why, self.restarts)
        self._set_parts(Part.down("restarting"), Part.down("restarting"))
        if proc is not None and proc.poll() is None:
            proc.kill()  # by its PID; SIGKILL ends a stopped process too
            proc.wait()
        self._silent_rounds = 0
        try:
            self._spawn(30.0)
        except RuntimeError as exc:
            # tried again after 1, 2, 4 ... 60 s: a process that cannot start does not flood the log
            self._failed_starts += 1
            delay = min(60.0, 2.0 ** (self._failed_starts - 1))
            self._retry_at = time.monotonic() + delay
            log.error("restarting the egress process failed (trying again in %.0f s): %s", delay, exc)
            return
        self._failed_starts = 0
        self._probe()

    @staticmethod
    def _end(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            proc = self.proc
        if proc is not None:
            self._end(proc)
        with contextlib.suppress(RuntimeError):
            self._watch.join(timeout=5)


def _enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.setns(fd, os.CLONE_NEWNET)
    finally:
        os.close(fd)


def _part(result: ProbeResult) -> Part:
    return Part.ok() if result.problem is None else Part.down(result.problem)
