"""The CLI's saved login: where it lives, its file mode, and the environment winning over it."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.cli.credentials import DEFAULT_URL, Credentials, credentials_path, load, save

KEY = "corral_live_" + "k" * 43


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CORRAL_URL", "CORRAL_API_KEY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 000, so the modes asserted are the ones the code asks for, not the umask's."""
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_path_follows_xdg_config_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert credentials_path() == tmp_path / "cfg" / "corral" / "credentials.json"


@pytest.mark.parametrize("xdg", [None, ""])
def test_path_defaults_to_dot_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str | None
) -> None:
    if xdg is not None:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg)
    assert credentials_path() == tmp_path / "home" / ".config" / "corral" / "credentials.json"


@pytest.mark.usefixtures("open_umask")
def test_saved_file_is_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = save("https://corral.example", KEY, tmp_path / "cfg" / "credentials.json")
    assert path == tmp_path / "cfg" / "credentials.json"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert json.loads(path.read_text()) == {"url": "https://corral.example", "api_key": KEY}
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.json"]


@pytest.mark.usefixtures("open_umask")
def test_save_to_the_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    path = save("http://h", KEY)
    assert path == tmp_path / "cfg" / "corral" / "credentials.json"
    assert _mode(path) == 0o600


@pytest.mark.usefixtures("open_umask")
def test_overwriting_keeps_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    save("http://one", KEY, path)
    path.chmod(0o644)
    save("http://two", KEY, path)
    assert _mode(path) == 0o600
    assert load(path).url == "http://two"


@pytest.mark.usefixtures("open_umask")
def test_a_stale_temporary_file_does_not_widen_the_mode(tmp_path: Path) -> None:
    # A crash between open() and replace() leaves credentials.tmp behind; O_TRUNC on an existing file keeps
    # its mode, so the next save would publish the key with whatever mode the leftover had.
    path = tmp_path / "credentials.json"
    stale = path.with_suffix(".tmp")
    stale.write_text("{}")
    stale.chmod(0o644)
    save("http://h", KEY, path)
    assert _mode(path) == 0o600


def test_round_trip(tmp_path: Path) -> None:
    path = save("https://corral.example/", KEY, tmp_path / "c.json")
    assert load(path) == Credentials(url="https://corral.example", api_key=KEY)


def test_nothing_saved_gives_the_default_url(tmp_path: Path) -> None:
    assert load(tmp_path / "missing.json") == Credentials(url=DEFAULT_URL, api_key=None)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Credentials(url="https://saved.example", api_key="saved-key")),
        # a saved key is only ever sent to the server it was saved for
        ({"CORRAL_URL": "https://env.example"}, Credentials(url="https://env.example", api_key=None)),
        (
            {"CORRAL_URL": "https://saved.example/"},
            Credentials(url="https://saved.example", api_key="saved-key"),
        ),
        ({"CORRAL_API_KEY": "env-key"}, Credentials(url="https://saved.example", api_key="env-key")),
        (
            {"CORRAL_URL": "https://env.example///", "CORRAL_API_KEY": "env-key"},
            Credentials(url="https://env.example", api_key="env-key"),
        ),
        (
            {"CORRAL_URL": "", "CORRAL_API_KEY": ""},
            Credentials(url="https://saved.example", api_key="saved-key"),
        ),
    ],
)
def test_environment_wins_over_the_saved_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], expected: Credentials
) -> None:
    path = save("https://saved.example", "saved-key", tmp_path / "c.json")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load(path) == expected


def test_environment_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_URL", "http://env:9")
    monkeypatch.setenv("CORRAL_API_KEY", "env-key")
    assert load(tmp_path / "missing.json") == Credentials(url="http://env:9", api_key="env-key")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", Credentials(url=DEFAULT_URL, api_key=None)),
        (b"[1, 2]", Credentials(url=DEFAULT_URL, api_key=None)),
        (b'"just a string"', Credentials(url=DEFAULT_URL, api_key=None)),
        (b"\xff\xfe\x00binary", Credentials(url=DEFAULT_URL, api_key=None)),
        (b"", Credentials(url=DEFAULT_URL, api_key=None)),
        (b'{"url": 5, "api_key": ["x"]}', Credentials(url=DEFAULT_URL, api_key=None)),
        (b'{"url": "http://h", "api_key": null}', Credentials(url="http://h", api_key=None)),
        (b'{"api_key": "only-key"}', Credentials(url=DEFAULT_URL, api_key=None)),  # for no known server
    ],
)
def test_a_damaged_file_is_ignored(tmp_path: Path, content: bytes, expected: Credentials) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(content)
    assert load(path) == expected


def test_a_directory_in_place_of_the_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.mkdir()
    assert load(path) == Credentials(url=DEFAULT_URL, api_key=None)


def test_load_reads_the_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    save("http://saved", "saved-key")
    assert load() == Credentials(url="http://saved", api_key="saved-key")


@pytest.mark.parametrize("render", [repr, str])
def test_repr_hides_the_key(render: Callable[[Credentials], str]) -> None:
    text = render(Credentials(url="http://h", api_key=KEY))
    assert KEY not in text
    assert "api_key=set" in text
    assert "api_key=None" in render(Credentials(url="http://h", api_key=None))
