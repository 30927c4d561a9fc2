"""The egress process as ``corral serve`` runs it: started inside the gateway namespace, restarted if it
dies, ended (by its PID) when the server stops, and killed by the kernel if the server dies first (so a
restarted server never finds an old one holding the ports)."""

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
from corral.egress.main import READY_FILE

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


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
        env = {**os.environ, **self._env()}
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.gateway_ns, sys.executable, "-m", "corral", "egress"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                preexec_fn=_die_with_parent,
            )
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
            self._spawn(self._timeout)
        except RuntimeError as exc:
            self._first_error = exc
            return
        finally:
            self._first.set()
        while not self._stop.wait(1.0):
            with self._lock:
                proc = self.proc
            if proc is not None and proc.poll() is not None and not self._stop.is_set():
                log.error("the egress process exited (%s); starting it again", proc.returncode)
                self.restarts += 1
                try:
                    self._spawn(30.0)
                except RuntimeError:
                    log.exception("restarting the egress process failed")

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
