"""corral-init, each sandbox's pid 1 (``init.c``), and the host's side of its exec protocol (``client``)."""

from __future__ import annotations

from pathlib import Path

SOURCE = Path(__file__).with_name("init.c")
BINARY = Path(__file__).with_name("corral-init")  # built by `make install` (gcc -static), not in git
