"""The installation's egress CA: made once, trusted by every sandbox, used by the proxy where it intercepts TLS."""

from __future__ import annotations

import os
from pathlib import Path

BASENAME = "mitmproxy"  # the proxy reads <dir>/mitmproxy-ca.pem (key and certificate)


def ensure_ca(directory: Path) -> Path:
    """Create the CA in ``directory`` (0700) if it has none; returns the path of its certificate (PEM)."""
    from mitmproxy.certs import CertStore

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    cert = directory / f"{BASENAME}-ca-cert.pem"
    if not (directory / f"{BASENAME}-ca.pem").exists():
        old = os.umask(0o077)
        try:
            CertStore.create_store(directory, BASENAME, 2048, organization="Corral", cn="Corral egress CA")
        finally:
            os.umask(old)
    return cert
