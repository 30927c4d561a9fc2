"""The server's bulkheads for long operations of this engineer's routes (exec, interactive sessions, SSH logins
in progress), their caps from the settings, and the scopes a request counts against. A full scope answers 429
``too_many_concurrent`` with ``Retry-After`` (:class:`corral.domain.bulkhead.TooManyConcurrent`)."""

from __future__ import annotations

from dataclasses import dataclass

from corral.config import Settings
from corral.domain.bulkhead import Bulkhead, Caps, Scope
from corral.ssh.gateway import SshLimits

ALL: Scope = ("all", "")


@dataclass(frozen=True)
class Bulkheads:
    execs: Bulkhead  # exec and exec/stream: per key, per VM, on the server
    sessions: Bulkhead  # terminals, shells, SSH sessions: per key (per account for SSH), per VM
    ssh_preauth: Bulkhead  # SSH connections not logged in yet: per source address, in total

    @classmethod
    def from_settings(cls, settings: Settings) -> Bulkheads:
        return cls(
            execs=Bulkhead(
                "exec",
                Caps(
                    {
                        "key": settings.max_execs_per_key,
                        "user": settings.max_execs_per_user,
                        "vm": settings.max_execs_per_vm,
                        "all": settings.max_execs,
                    }
                ),
            ),
            sessions=Bulkhead(
                "interactive session",
                Caps(
                    {
                        "key": settings.max_sessions_per_key,
                        "user": settings.max_sessions_per_key,
                        "vm": settings.max_sessions_per_vm,
                    }
                ),
            ),
            ssh_preauth=Bulkhead(
                "SSH login",
                Caps({"source": settings.ssh_preauth_per_source, "all": settings.ssh_preauth_max}),
            ),
        )


def exec_scopes(key_id: str, user_id: str, vm_id: str) -> list[Scope]:
    """Keys are free, so the account (``user``) is the tenant's scope; its cap (64) is 1/16 of the server's
    (1024), so at least 16 accounts at their cap are needed before another tenant's exec gets 429."""
    return [("key", key_id), ("user", user_id), ("vm", vm_id), ALL]


def session_scopes(key_id: str, user_id: str, vm_id: str) -> list[Scope]:
    """A terminal or a shell opened with an API key: counted per key, per account (shared with SSH), per VM."""
    return [("key", key_id), ("user", user_id), ("vm", vm_id)]


def preauth_scopes(source: str) -> list[Scope]:
    return [("source", source), ALL]


def ssh_limits(bulkheads: Bulkheads, settings: Settings) -> SshLimits:
    """The gateway's: SSH sessions share the session caps of terminals and shells (per account, per VM)."""
    return SshLimits(bulkheads.ssh_preauth, bulkheads.sessions, settings.ssh_login_timeout_s)
