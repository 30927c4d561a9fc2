"""Log lines never carry a credential: API keys in ``?token=`` (terminal and shell WebSockets from a
browser), proxy tickets in ``?corral_ticket=``, and anything shaped like an API key, are replaced by
``[redacted]`` before any handler writes the line (uvicorn's access log prints the whole request target)."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

from uvicorn.config import LOGGING_CONFIG

from corral.security.tokens import TOKEN_PREFIX

REDACTED = "[redacted]"
_QUERY = re.compile(r"(?i)((?:^|[?&;\s\"'])(?:token|corral_ticket|access_token)=)[^&\s\"'#]*")
_KEY = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_\-]+")


def redact(text: str) -> str:
    return _KEY.sub(REDACTED, _QUERY.sub(r"\1" + REDACTED, text))


def _clean(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """A handler filter: the record's message and its string arguments redacted in place (the arguments
    keep their shape: uvicorn's access formatter unpacks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        return True


def install_on_root() -> None:
    """The filter on every handler of the root logger (the ``corral`` loggers write through them)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration with the filter on its handlers (error and access logs)."""
    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": f"{__name__}.RedactSecrets"}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact"]
    return config
