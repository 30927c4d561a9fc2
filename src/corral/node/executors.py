"""Bounded thread pools, one per purpose, for the blocking steps of async code, so one kind of work cannot
starve another (asyncio's default executor, ``asyncio.to_thread``, is ``min(32, cpus + 4)`` threads shared by
everything that uses it; eight stalled uploads once held all of it and SSH logins waited behind them).

- ``SSH_AUTH``: the SSH gateway's look-ups before and during authentication (the VM's key, its state).
- ``SESSIONS``: setting up interactive sessions and exec (a pty in the sandbox's devpts, the connection of an
  ``ssh -L`` into its network namespace, the command server's socket look-up).
- ``KILLS``: killing a command's session from the host when its client leaves or it times out (up to 10 s
  each against a fork bomb: kept apart, so many of them cannot delay anyone's session set-up).
- ``EXEC_RUNTIME``: commands of sandboxes without corral-init, which go through the runtime's exec and are
  read by a thread for their whole run: sized to the server's exec cap (``configure``), so a command the caps
  let in always has its thread and one tenant's commands never queue another's.

Each pool is made on first use and lives as long as the process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

SSH_AUTH: Final = "ssh-auth"
SESSIONS: Final = "sessions"
KILLS: Final = "kills"
EXEC_RUNTIME: Final = "exec-runtime"

SIZES: dict[str, int] = {SSH_AUTH: 8, SESSIONS: 8, KILLS: 8, EXEC_RUNTIME: 16}

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def configure(name: str, size: int) -> None:
    """The size of the pool ``name``, before its first use (threads are started only as work arrives)."""
    with _lock:
        if name in _pools:
            raise RuntimeError(f"the {name} pool is already in use")
        SIZES[name] = size


def in_use(name: str) -> bool:
    with _lock:
        return name in _pools


def pool(name: str) -> ThreadPoolExecutor:
    """The pool for ``name`` (one of the names above), made on first use."""
    with _lock:
        found = _pools.get(name)
        if found is None:
            found = ThreadPoolExecutor(SIZES[name], thread_name_prefix=f"corral-{name}")
            _pools[name] = found
        return found


async def run[T](name: str, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on the pool ``name``, awaited."""
    return await asyncio.get_running_loop().run_in_executor(pool(name), fn, *args)


def submit(name: str, fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` on the pool ``name``, not awaited (clean-up that must happen even when the caller is being
    cancelled)."""
    pool(name).submit(fn, *args)


_END = object()


async def iterate[T](
    name: str, items: Iterator[T], on_close: Callable[[], None] | None = None
) -> AsyncGenerator[T]:
    """A blocking iterator read on the pool ``name``. Closing this before the end calls ``on_close`` (which
    should make a pending ``next`` return soon) and then closes ``items`` on the pool, once no ``next`` of it
    runs any more (a generator cannot be closed while it runs)."""
    ex = pool(name)
    pending: Future[object] | None = None
    try:
        while True:
            pending = ex.submit(next, items, _END)
            item = await asyncio.wrap_future(pending)
            pending = None
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(items, "close", None)
        if pending is not None and not pending.done():
            if on_close is not None:
                on_close()
            if close is not None:
                pending.add_done_callback(lambda _: ex.submit(close))
        elif close is not None:
            ex.submit(close)
