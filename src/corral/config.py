"""Settings, read once from the environment (``CORRAL_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral"


def _int(env: dict[str, str], name: str, default: int) -> int:
    """A positive integer setting."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, got {value}")
    return value


def prepare_data_dir(path: Path) -> None:
    """Create the data directory private to the server (0700): it holds the database and the secret key."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077 and path.stat().st_uid == os.geteuid():
        path.chmod(0o700)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    secret_key_file: Path
    public_url: str | None = None  # base URL users reach the API at (device-login links); else the request's
    rate_limit_per_minute: int = 600  # per API key
    rate_limit_burst: int = 100
    anon_rate_limit_per_minute: int = 60  # per client address, for the endpoints without auth
    anon_rate_limit_burst: int = 20
    max_body_bytes: int = 1024 * 1024
    device_code_ttl_seconds: int = 900

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("CORRAL_DATA_DIR") or default_data_dir(env))
        url = env.get("CORRAL_DATABASE_URL") or f"sqlite:///{data_dir / 'corral.db'}"
        return cls(
            data_dir=data_dir,
            database_url=url,
            secret_key_file=Path(env.get("CORRAL_SECRET_KEY_FILE") or data_dir / "secret.key"),
            public_url=(env.get("CORRAL_PUBLIC_URL") or None),
            rate_limit_per_minute=_int(env, "CORRAL_RATE_LIMIT_PER_MINUTE", 600),
            rate_limit_burst=_int(env, "CORRAL_RATE_LIMIT_BURST", 100),
            anon_rate_limit_per_minute=_int(env, "CORRAL_ANON_RATE_LIMIT_PER_MINUTE", 60),
            anon_rate_limit_burst=_int(env, "CORRAL_ANON_RATE_LIMIT_BURST", 20),
            max_body_bytes=_int(env, "CORRAL_MAX_BODY_BYTES", 1024 * 1024),
            device_code_ttl_seconds=_int(env, "CORRAL_DEVICE_CODE_TTL", 900),
        )
