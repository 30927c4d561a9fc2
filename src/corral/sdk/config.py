"""Where a client finds its server and API key: the arguments, else ``CORRAL_URL`` / ``CORRAL_API_KEY``, else
the CLI's saved login (``corral login``), else the CLI's default URL and no key."""

from __future__ import annotations

import os
from dataclasses import dataclass

from corral.cli import credentials
from corral.sdk.errors import ConfigError

DEFAULT_URL = credentials.DEFAULT_URL


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str | None

    def __repr__(self) -> str:
        return f"Config(base_url={self.base_url!r}, api_key={'set' if self.api_key else None})"

    def authorization(self) -> str:
        if not self.api_key:
            raise ConfigError(
                "No API key: pass api_key=..., set CORRAL_API_KEY, or run `corral login` "
                f"(for {self.base_url})"
            )
        return f"Bearer {self.api_key}"


def resolve(api_key: str | None = None, base_url: str | None = None) -> Config:
    """The settings a client uses. A key saved by ``corral login`` goes only to the server it came from."""
    saved = credentials.load()  # CORRAL_URL / CORRAL_API_KEY over the saved login
    url = (base_url or saved.url).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must be an http:// or https:// URL, not {url!r}")
    if api_key:
        return Config(url, api_key)
    if url == saved.url:
        return Config(url, saved.api_key)
    return Config(url, os.environ.get("CORRAL_API_KEY") or None)
