"""Getting into a VM interactively (SSH, terminal, shell): which VM, whether it can take a session now, and
the environment its commands start with (the same as exec's: the owner's ``/v1/env`` and secret
placeholders)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from corral.domain.errors import Conflict
from corral.domain.vm_states import Detail
from corral.node.files import FileError, SandboxFiles
from corral.node.interactive import Pty, Session
from corral.node.local import NodeError
from corral.services import env as env_service
from corral.services import secrets as secrets_service
from corral.services.lifecycle import Lifecycle
from corral.ssh.gateway import Backend, Target, unusable
from corral.store.tables import Vm

HOME = "/root"


def command_env(session: DbSession, user_id: str) -> dict[str, str]:
    """What a command started for ``user_id`` gets on top of the node's base environment."""
    return {
        **secrets_service.placeholder_env(session, user_id),
        **env_service.environment_of(session, user_id),
    }


def login_env(extra: dict[str, str]) -> dict[str, str]:
    return {"HOME": HOME, "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", **extra}


class Access:
    """Interactive sessions in the caller's VMs, through the lifecycle's node."""

    def __init__(self, life: Lifecycle, reads: sessionmaker[DbSession]) -> None:
        self.life = life
        self.reads = reads

    def target(self, user_id: str, vm_id: str) -> Target:
        """The caller's running VM (404 for another user's or an unknown one, 409 when not running)."""
        with self.reads() as session:
            cid = self.life.running_container(user_id, vm_id, session)
        if self.life.node.pid(cid) is None:
            raise Conflict("VM is not running", code="vm_not_running")
        return Target(vm_id, user_id, cid)

    def files(self, target: Target) -> tuple[SandboxFiles, int]:
        """The VM's files as it runs now, with its root held open (the fd, for the caller to close); checked
        after the opening to still be the VM's init, so a PID reused meanwhile is never reached."""
        try:
            files = self.life.node.files(target.cid)
            pinned, root = files.pinned()
        except (NodeError, FileError):
            raise Conflict("VM is not running", code="vm_not_running") from None
        if self.life.node.pid(target.cid) != files.pid:
            os.close(root)
            raise Conflict("VM is not running", code="vm_not_running")
        return pinned, root

    async def start(
        self, target: Target, args: Sequence[str], extra: dict[str, str], pty: Pty | None
    ) -> Session:
        with self.reads() as session:
            env = command_env(session, target.user_id)
        return await self.life.node.open_session(
            target.cid, args, env=login_env({**env, **extra}), cwd=HOME, pty=pty
        )

    # ---- for the SSH gateway --------------------------------------------------------------------------------

    def ssh_key(self, vm_id: str) -> tuple[str, str] | None:
        with self.reads() as session:
            vm = session.get(Vm, vm_id)
            if vm is None or vm.status_detail == Detail.DESTROYED.value:
                return None
            return vm.user_id, vm.public_key

    def ssh_target(self, user_id: str, vm_id: str) -> Target | str:
        try:
            return self.target(user_id, vm_id)
        except Conflict:
            with self.reads() as session:
                vm = session.get(Vm, vm_id)
                return unusable(Detail(vm.status_detail) if vm is not None else Detail.DESTROYED)

    def ssh_backend(self) -> Backend:
        return Backend(self.ssh_key, self.ssh_target, self.start, self.files)
