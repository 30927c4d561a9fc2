"""Where the CLI keeps its login: ``$XDG_CONFIG_HOME/corral/credentials.json`` (mode 0600)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "corral" / "credentials.json"


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str | None

    def __repr__(self) -> str:
        return f"Credentials(url={self.url!r}, api_key={'set' if self.api_key else None})"


def save(url: str, api_key: str, path: Path | None = None) -> Path:
    path = path or credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # a new file, mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"url": url, "api_key": api_key}, out)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load(path: Path | None = None) -> Credentials:
    """``CORRAL_URL`` / ``CORRAL_API_KEY`` win over the saved login."""
    saved: dict[str, str] = {}
    path = path or credentials_path()
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            if isinstance(raw, dict):
                saved = {k: v for k, v in raw.items() if isinstance(v, str)}
        except (OSError, ValueError):
            saved = {}
    url = (os.environ.get("CORRAL_URL") or saved.get("url") or DEFAULT_URL).rstrip("/")
    key = os.environ.get("CORRAL_API_KEY") or None
    if key is None and saved.get("url", "").rstrip("/") == url:
        key = saved.get("api_key")  # a saved key goes only to the server it was issued by
    return Credentials(url=url, api_key=key)
