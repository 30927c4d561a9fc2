"""The egress process lives in the gateway's network namespace, where 127.0.0.1 is the gateway's own loopback
and the host is unreachable by design. Its store connections must not depend on that: every store call runs
in one thread that entered the host's network namespace (a namespace is per thread, and a socket keeps the
namespace it was made in), given by ``corral serve`` as an inherited descriptor. So a PostgreSQL on the
host's loopback, a host name only the host resolves, or a unix socket all work as they do for the API."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

HOST_NETNS_FD_ENV = "CORRAL_EGRESS_HOST_NETNS_FD"


def host_netns_fd(env: dict[str, str] | None = None) -> int | None:
    """The descriptor of the host's network namespace ``corral serve`` passed down, if any."""
    raw = (env if env is not None else dict(os.environ)).get(HOST_NETNS_FD_ENV, "")
    return int(raw) if raw.isdigit() else None


class HostCalls:
    """Runs calls, one at a time, in a thread of the network namespace ``netns_fd`` (None: this one)."""

    def __init__(self, netns_fd: int | None) -> None:
        self._fd = netns_fd
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="egress-store", initializer=self._enter)

    def _enter(self) -> None:
        if self._fd is not None:
            os.setns(self._fd, os.CLONE_NEWNET)

    def call[T](self, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
