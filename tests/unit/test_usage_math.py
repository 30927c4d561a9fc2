"""Accounting arithmetic (``corral.domain.usage``), the usage report's lines (``corral.domain.rollup``), the price
table (``corral.domain.pricing``), the cgroup reader on fake cgroup trees, the timer loop's sleep and the
egress byte counter."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from corral.config import Settings
from corral.domain import rollup, usage
from corral.domain.errors import InvalidParameter
from corral.domain.pricing import DEFAULT_PRICES, Prices, Quantities, cents, cost_micro_cents, parse_prices
from corral.domain.usage import GIB, DayUsage, Meter, Reading
from corral.egress.addon import Traffic
from corral.runtime.cgroup_usage import CgroupUsage, cpu_stat_usage_ns
from corral.services.audit import NewEvent
from corral.services.timers import MAX_SLEEP_S, RETRY_S, next_wake

T0 = datetime(2026, 3, 9, 23, 59, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- counters, days, samples -------------------------------------------------------------------------------


def test_counter_delta_grows_or_restarts() -> None:
    assert usage.counter_delta(100, 250) == 150
    assert usage.counter_delta(100, 100) == 0
    assert usage.counter_delta(5_000, 40) == 40  # a new cgroup: all of it is new


def test_day_spans_split_at_utc_midnight() -> None:
    assert usage.day_spans(at(0), at(120)) == [(date(2026, 3, 9), 60_000), (date(2026, 3, 10), 60_000)]
    assert usage.day_spans(at(0), at(30)) == [(date(2026, 3, 9), 30_000)]
    assert usage.day_spans(at(10), at(10)) == []
    three = usage.day_spans(at(0), at(61 + 2 * 86400))
    assert [d for d, _ in three] == [
        date(2026, 3, 9),
        date(2026, 3, 10),
        date(2026, 3, 11),
        date(2026, 3, 12),
    ]
    assert sum(ms for _, ms in three) == (61 + 2 * 86400) * 1000


@pytest.mark.parametrize(
    ("total", "weights"), [(10, [1, 1, 1]), (7, [0, 0]), (0, [5, 3]), (1_000_003, [60_000, 1, 86_400_000])]
)
def test_apportion_adds_up_exactly(total: int, weights: list[int]) -> None:
    shares = usage.apportion(total, weights)
    assert len(shares) == len(weights)
    assert sum(shares) == total
    assert all(s >= 0 for s in shares)


def test_a_sample_adds_cpu_uptime_and_memory_split_over_days() -> None:
    meter = usage.start(Meter(), Reading(cpu_ns=2_000_000_000, mem_bytes=GIB, mem_peak_bytes=GIB), at(0))
    assert meter.at == at(0)
    assert meter.cpu_ns == 2_000_000_000  # what ran before the VM was the VM's is not counted
    meter, days = usage.sample(meter, Reading(4_000_000_000, 3 * GIB, 5 * GIB), at(120))
    assert meter.total_cpu_us == 2_000_000
    assert meter.total_uptime_ms == 120_000
    assert meter.mem_peak_bytes == 5 * GIB
    assert meter.at == at(120)
    assert set(days) == {date(2026, 3, 9), date(2026, 3, 10)}
    assert sum(d.cpu_us for d in days.values()) == 2_000_000
    assert days[date(2026, 3, 9)].cpu_us == 1_000_000  # half the time before midnight
    # memory: the mean of 1 and 3 GiB for 120 s = 240 GiB-seconds, in KiB-ms
    assert sum(d.mem_kib_ms for d in days.values()) == 240 * 1024 * 1024 * 1000
    assert [d.uptime_ms for d in days.values()] == [60_000, 60_000]


def test_a_restarted_cgroup_counts_from_zero_and_stopping_ends_the_meter() -> None:
    meter = usage.start(Meter(), Reading(10_000_000_000, 0, 0), at(0))
    meter, _ = usage.sample(meter, Reading(11_000_000_000, 0, 0), at(1), running=False)
    assert meter.at is None
    assert meter.total_cpu_us == 1_000_000
    # stopped: nothing is added, whatever the clock says
    same, days = usage.sample(meter, Reading(99, 0, 0), at(500))
    assert same == meter
    assert days == {}
    # started again (a new cgroup), then restored from a checkpoint: the counter starts over below the last
    meter = usage.start(meter, Reading(300_000_000, 0, 0), at(10))
    meter, _ = usage.sample(meter, Reading(900_000_000, 0, 0), at(11))
    meter, _ = usage.sample(meter, Reading(200_000_000, 0, 0), at(12))
    assert meter.total_cpu_us == 1_000_000 + 600_000 + 200_000
    assert meter.total_uptime_ms == 1000 + 2000


def test_an_unreadable_cgroup_adds_nothing() -> None:
    meter = usage.start(Meter(), Reading(5, GIB, GIB), at(0))
    kept, days = usage.sample(meter, None, at(30))
    assert kept == meter
    assert days == {}
    ended, _ = usage.sample(meter, None, at(30), running=False)
    assert ended.at is None
    assert ended.total_uptime_ms == 0


def test_existence_hours_are_clipped_to_the_range() -> None:
    hours = usage.existence_hours_by_day(
        datetime(2026, 3, 9, 18, tzinfo=UTC),
        datetime(2026, 3, 11, 6, tzinfo=UTC),
        date(2026, 3, 10),
        date(2026, 3, 11),
    )
    assert hours == {date(2026, 3, 10): 24.0, date(2026, 3, 11): 6.0}


# --- the report --------------------------------------------------------------------------------------------


def test_report_lines_and_totals() -> None:
    d1, d2 = date(2026, 3, 9), date(2026, 3, 10)
    measured = {
        (d1, "vm_a"): DayUsage(2_500_000, 1024 * 1024 * 1000 * 10, 5),
        (d2, "vm_b"): DayUsage(1, 0, 1),
    }
    disk = {(d1, "vm_a"): 2.0, (d2, "vm_a"): 1.0}
    egress = {(d2, "vm_b"): 2**30}
    lines = rollup.lines(measured, disk, egress, DEFAULT_PRICES)
    assert [(x.day, x.vm_id) for x in lines] == [(d1, "vm_a"), (d2, "vm_a"), (d2, "vm_b")]
    first = lines[0]
    assert (first.cpu_seconds, first.mem_gib_seconds, first.disk_gib_hours) == (2.5, 10.0, 2.0)
    assert first.cost_micro_cents == round((2.5 * 0.0014 + 10 * 0.00015 + 2 * 0.014) * 1_000_000)
    assert lines[2].cost_micro_cents == round(9.0 * 1_000_000 + 1e-6 * 0.0014 * 1_000_000)
    total = rollup.totals(lines)
    assert total.cost_micro_cents == sum(x.cost_micro_cents for x in lines)
    assert total.egress_bytes == 2**30
    assert total.disk_gib_hours == 3.0


def test_parse_range() -> None:
    assert rollup.parse_range("2026-01-01", "2026-12-31") == (date(2026, 1, 1), date(2026, 12, 31))
    assert rollup.parse_range("2028-01-01", "2028-12-31")[1] == date(2028, 12, 31)  # 366 days
    for first, last in (
        (None, "2026-01-01"),
        ("2026-01-01", None),
        ("2026-1-01", "2026-01-02"),
        ("20260101", "2026-01-02"),
        ("2026-01-02", "2026-01-01"),
        ("2026-01-01", "2027-01-02"),
        ("2026-02-29", "2026-03-01"),
    ):
        with pytest.raises(InvalidParameter):
            rollup.parse_range(first, last)


# --- prices ------------------------------------------------------------------------------------------------


def test_cost_is_rounded_to_a_millionth_of_a_cent() -> None:
    q = Quantities(cpu_seconds=1.0, mem_gib_seconds=0.0, disk_gib_hours=0.0, egress_bytes=0)
    assert cost_micro_cents(q, Prices(cpu_second_cents=0.0000004)) == 0
    assert cost_micro_cents(q, Prices(cpu_second_cents=0.0000006)) == 1
    assert cents(1_500_000) == 1.5


def test_prices_from_text_or_file(tmp_path: Path) -> None:
    assert parse_prices('{"cpu_second_cents": 1, "egress_gib_cents": 0}') == Prices(
        cpu_second_cents=1.0, egress_gib_cents=0.0
    )
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"disk_gib_hour_cents": 0.5}))
    assert parse_prices(str(f)).disk_gib_hour_cents == 0.5
    assert parse_prices(str(f)).cpu_second_cents == DEFAULT_PRICES.cpu_second_cents


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{nope", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"gpu_cents": 1}', "unknown price keys: gpu_cents"),
        ('{"cpu_second_cents": "1"}', "must be a number"),
        ('{"cpu_second_cents": true}', "must be a number"),
        ('{"cpu_second_cents": -1}', ">= 0"),
        ('{"cpu_second_cents": 1e999}', "finite"),
        ("/nonexistent/prices.json", "cannot read the price file"),
    ],
)
def test_bad_price_tables_say_what_is_wrong(raw: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_prices(raw)


# --- cgroups -------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_reader_v1_hybrid(tmp_path: Path) -> None:
    for c in ("cpuacct", "memory", "unified"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "cgroup.procs").write_text("")
    sandbox = "corral-n1/vm_a"
    _write(tmp_path / "cpuacct" / sandbox / "cpuacct.usage", "123456789\n")
    _write(tmp_path / "memory" / sandbox / "memory.usage_in_bytes", "4096\n")
    _write(tmp_path / "memory" / sandbox / "memory.max_usage_in_bytes", "8192\n")
    reader = CgroupUsage("corral-n1", tmp_path)
    assert reader.read("vm_a") == Reading(cpu_ns=123456789, mem_bytes=4096, mem_peak_bytes=8192)
    assert reader.read("vm_gone") is None


def test_cgroup_reader_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    base = tmp_path / "corral-n1" / "vm_a"
    _write(base / "cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    _write(base / "memory.current", "2048\n")
    reader = CgroupUsage("corral-n1", tmp_path)
    assert reader.read("vm_a") == Reading(
        cpu_ns=1_500_000, mem_bytes=2048, mem_peak_bytes=2048
    )  # no peak file
    _write(base / "memory.peak", "65536\n")
    assert reader.read("vm_a") == Reading(1_500_000, 2048, 65536)
    assert cpu_stat_usage_ns("user_usec 3\n") is None


# --- the timer loop and the egress byte counter -------------------------------------------------------------


def test_the_timer_loop_sleeps_until_the_first_thing_due() -> None:
    now = at(0)
    assert next_wake(now, None, 30.0, retry=False) == 30.0
    assert next_wake(now, at(2), 30.0, retry=False) == 2.0
    assert next_wake(now, at(2), 0.5, retry=False) == 0.5
    assert next_wake(now, None, 10_000.0, retry=False) == MAX_SLEEP_S
    assert next_wake(now, None, 30.0, retry=True) == RETRY_S
    assert next_wake(now, at(-5), 30.0, retry=False) == RETRY_S  # a deadline that could not be met yet
    assert next_wake(now, None, -1.0, retry=False) == 0.0


def test_traffic_gives_each_event_the_bytes_since_it_was_decided() -> None:
    event = NewEvent(
        "usr_a", at(0), "vm_a", "example.org", None, "http", "allowed", True, "enforce", id="ev_1"
    )
    traffic = Traffic()
    traffic.up, traffic.down = 100, 0
    assert traffic.settle() is None
    traffic.event = event
    traffic.up, traffic.down = 150, 5000
    first = traffic.settle()
    assert first is not None
    assert (first.id, first.bytes_up, first.bytes_down) == ("ev_1", 150, 5000)
    traffic.event = event
    traffic.up, traffic.down = 160, 5100
    second = traffic.settle()
    assert second is not None
    assert (second.bytes_up, second.bytes_down) == (10, 100)
    assert traffic.settle() is None


def test_settings_check_prices_and_the_sample_interval_at_start() -> None:
    assert Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x"}).prices == DEFAULT_PRICES
    got = Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x", "CORRAL_PRICES": '{"egress_gib_cents": 1}'})
    assert got.prices.egress_gib_cents == 1.0
    assert (
        Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x", "CORRAL_USAGE_INTERVAL_S": "0.2"}).usage_interval_s
        == 0.2
    )
    with pytest.raises(SystemExit, match="CORRAL_PRICES: unknown price keys"):
        Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x", "CORRAL_PRICES": '{"x": 1}'})
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(SystemExit, match="CORRAL_USAGE_INTERVAL_S"):
            Settings.from_env({"CORRAL_DATA_DIR": "/tmp/x", "CORRAL_USAGE_INTERVAL_S": bad})
