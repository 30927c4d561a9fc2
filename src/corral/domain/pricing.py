"""The price table and what a usage line costs. Costs are worked out in millionths of a cent (integers), so
a total is exactly the sum of its lines; the API shows them as cents with six decimals.

Defaults (docs/api.md, "Usage"), overridable with ``CORRAL_PRICES`` (a JSON object, or the path of a file
holding one, with any of these keys):

============================  ==========  ===================================================
key                           default     unit
============================  ==========  ===================================================
``cpu_second_cents``          0.0014      per CPU-second used (about 5 cents per CPU-hour)
``mem_gib_second_cents``      0.00015     per GiB-second of memory in use
``disk_gib_hour_cents``       0.014       per GiB-hour of disk allocated (about 10 cents a GiB-month)
``egress_gib_cents``          9.0         per GiB through the egress proxy (both ways)
============================  ==========  ===================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

MICRO = 1_000_000


@dataclass(frozen=True)
class Prices:
    cpu_second_cents: float = 0.0014
    mem_gib_second_cents: float = 0.00015
    disk_gib_hour_cents: float = 0.014
    egress_gib_cents: float = 9.0


DEFAULT_PRICES = Prices()
KEYS = tuple(f.name for f in fields(Prices))


@dataclass(frozen=True)
class Quantities:
    cpu_seconds: float
    mem_gib_seconds: float
    disk_gib_hours: float
    egress_bytes: int


def cost_micro_cents(q: Quantities, prices: Prices) -> int:
    """What ``q`` costs, in millionths of a cent, rounded to the nearest."""
    cents = (
        q.cpu_seconds * prices.cpu_second_cents
        + q.mem_gib_seconds * prices.mem_gib_second_cents
        + q.disk_gib_hours * prices.disk_gib_hour_cents
        + q.egress_bytes / 1024**3 * prices.egress_gib_cents
    )
    return round(cents * MICRO)


def cents(micro_cents: int) -> float:
    return micro_cents / MICRO


def parse_prices(raw: str) -> Prices:
    """A price table from ``CORRAL_PRICES``: JSON text (starting with ``{``) or the path of a JSON file. Keys left out
    keep their default. Raises ValueError with a message that says what is wrong."""
    text = raw.strip()
    if not text.startswith(("{", "[")):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the price file {raw!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the price table is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("the price table must be a JSON object")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown price keys: {', '.join(unknown)} (known: {', '.join(KEYS)})")
    values: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"price {key} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"price {key} must be a finite number >= 0, got {value!r}")
        values[key] = float(value)
    return Prices(**values)
