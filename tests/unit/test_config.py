"""Settings read once from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.config import Settings, default_data_dir

_INT_FIELDS = [
    ("CORRAL_RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute", 600),
    ("CORRAL_RATE_LIMIT_BURST", "rate_limit_burst", 100),
    ("CORRAL_ANON_RATE_LIMIT_PER_MINUTE", "anon_rate_limit_per_minute", 60),
    ("CORRAL_ANON_RATE_LIMIT_BURST", "anon_rate_limit_burst", 20),
    ("CORRAL_MAX_BODY_BYTES", "max_body_bytes", 1024 * 1024),
    ("CORRAL_DEVICE_CODE_TTL", "device_code_ttl_seconds", 900),
]


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A non-root process whose home is under tmp_path, with no XDG_DATA_HOME."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.mark.usefixtures("as_root")
def test_root_keeps_data_in_var_lib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/ignored")
    assert default_data_dir() == Path("/var/lib/corral")


def test_user_keeps_data_in_home(as_user: Path) -> None:
    assert default_data_dir() == as_user / ".local" / "share" / "corral"


@pytest.mark.usefixtures("as_user")
def test_user_data_follows_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "corral"


@pytest.mark.usefixtures("as_user")
def test_empty_xdg_data_home_is_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "")
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "corral"


@pytest.mark.usefixtures("as_root")
def test_defaults_for_root() -> None:
    settings = Settings.from_env({})
    assert settings.data_dir == Path("/var/lib/corral")
    assert settings.database_url == "sqlite:////var/lib/corral/corral.db"
    assert settings.secret_key_file == Path("/var/lib/corral/secret.key")
    assert settings.public_url is None
    for _, field, default in _INT_FIELDS:
        assert getattr(settings, field) == default


def test_defaults_for_a_user(as_user: Path) -> None:
    settings = Settings.from_env({})
    data = as_user / ".local" / "share" / "corral"
    assert settings.data_dir == data
    assert settings.database_url == f"sqlite:///{data / 'corral.db'}"
    assert settings.secret_key_file == data / "secret.key"


@pytest.mark.usefixtures("as_user")
def test_explicit_env_is_the_only_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # from_env(env) should read env, not the process environment: here XDG_DATA_HOME is only in env.
    settings = Settings.from_env({"XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert settings.data_dir == tmp_path / "xdg" / "corral"


@pytest.mark.usefixtures("as_user")
def test_explicit_env_ignores_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "from-process"))
    monkeypatch.setenv("CORRAL_RATE_LIMIT_BURST", "not a number")
    settings = Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path / "given")})
    assert settings.data_dir == tmp_path / "given"
    assert settings.rate_limit_burst == 100


@pytest.mark.usefixtures("as_user")
def test_none_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "proc"))
    monkeypatch.setenv("CORRAL_RATE_LIMIT_BURST", "7")
    settings = Settings.from_env()
    assert settings.data_dir == tmp_path / "proc"
    assert settings.rate_limit_burst == 7


@pytest.mark.usefixtures("as_root")
def test_overrides(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "CORRAL_DATA_DIR": str(tmp_path / "data"),
            "CORRAL_DATABASE_URL": "postgresql://db/corral",
            "CORRAL_SECRET_KEY_FILE": str(tmp_path / "keys" / "k"),
            "CORRAL_PUBLIC_URL": "https://corral.example",
        }
    )
    assert settings.data_dir == tmp_path / "data"
    assert settings.database_url == "postgresql://db/corral"
    assert settings.secret_key_file == tmp_path / "keys" / "k"
    assert settings.public_url == "https://corral.example"


@pytest.mark.usefixtures("as_root")
def test_data_dir_moves_the_default_database_and_key(tmp_path: Path) -> None:
    settings = Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'corral.db'}"
    assert settings.secret_key_file == tmp_path / "secret.key"


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(
    "name", ["CORRAL_DATA_DIR", "CORRAL_DATABASE_URL", "CORRAL_SECRET_KEY_FILE", "CORRAL_PUBLIC_URL"]
)
def test_empty_strings_mean_unset(name: str) -> None:
    assert Settings.from_env({name: ""}) == Settings.from_env({})


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(("env_name", "field", "default"), _INT_FIELDS)
@pytest.mark.parametrize(
    ("raw", "expected"), [("", None), ("42", 42), (" 42 ", 42), ("1", 1), ("1_000", 1000)]
)
def test_integers(env_name: str, field: str, default: int, raw: str, expected: int | None) -> None:
    settings = Settings.from_env({env_name: raw})
    assert getattr(settings, field) == (default if expected is None else expected)


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(("env_name", "field", "default"), _INT_FIELDS)
@pytest.mark.parametrize("raw", ["ten", "1.5", "1e3", "0x10", "--1"])
def test_bad_integer_is_a_clear_exit(env_name: str, field: str, default: int, raw: str) -> None:
    with pytest.raises(SystemExit) as info:
        Settings.from_env({env_name: raw})
    assert str(info.value) == f"{env_name} must be an integer, got {raw!r}"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="sqlite://", secret_key_file=tmp_path / "k")
    with pytest.raises(AttributeError):
        settings.max_body_bytes = 1  # type: ignore[misc]


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(("env_name", "field", "default"), _INT_FIELDS)
@pytest.mark.parametrize("raw", ["0", "-5"])
def test_non_positive_integer_is_a_clear_exit(env_name: str, field: str, default: int, raw: str) -> None:
    with pytest.raises(SystemExit) as info:
        Settings.from_env({env_name: raw})
    assert str(info.value) == f"{env_name} must be at least 1, got {int(raw)}"


def test_data_dir_is_private_but_traversable(tmp_path: Path) -> None:
    from corral.config import prepare_data_dir

    fresh = tmp_path / "a" / "data"
    prepare_data_dir(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o711
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    prepare_data_dir(loose)
    assert loose.stat().st_mode & 0o777 == 0o711


# --- node settings --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("as_root")
def test_node_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.node is True
    assert settings.runtime == "crun"
    assert settings.warm_pool_size == 2
    assert settings.images_dir is None


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(
    ("raw", "expected"),
    [("on", True), ("ON", True), ("1", True), ("true", True), ("yes", True), (" on ", True),
     ("off", False), ("Off", False), ("0", False), ("false", False), ("no", False), ("", True)],
)  # fmt: skip
def test_node_on_off(raw: str, expected: bool) -> None:
    assert Settings.from_env({"CORRAL_NODE": raw}).node is expected


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "o n"])
def test_node_garbage_is_a_clear_exit(raw: str) -> None:
    with pytest.raises(SystemExit) as info:
        Settings.from_env({"CORRAL_NODE": raw})
    assert "CORRAL_NODE must be on or off" in str(info.value)
    assert repr(raw) in str(info.value)


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize("raw", ["crun", "runc"])
def test_runtime_choice(raw: str) -> None:
    assert Settings.from_env({"CORRAL_RUNTIME": raw}).runtime == raw


@pytest.mark.usefixtures("as_root")
def test_empty_runtime_means_crun() -> None:
    assert Settings.from_env({"CORRAL_RUNTIME": ""}).runtime == "crun"


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize("raw", ["docker", "CRUN", "kata", "/usr/bin/crun", " runc"])
def test_runtime_garbage_is_a_clear_exit(raw: str) -> None:
    with pytest.raises(SystemExit) as info:
        Settings.from_env({"CORRAL_RUNTIME": raw})
    assert str(info.value) == f"CORRAL_RUNTIME must be one of crun, runc, got {raw!r}"


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(("raw", "expected"), [("0", 0), ("1", 1), ("5", 5), ("", 2)])
def test_warm_pool_size(raw: str, expected: int) -> None:
    assert Settings.from_env({"CORRAL_WARM_POOL_SIZE": raw}).warm_pool_size == expected


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize("raw", ["-1", "-0", "two", "1.5", "+3"])
def test_warm_pool_size_refuses_negative_and_garbage(raw: str) -> None:
    with pytest.raises(SystemExit) as info:
        Settings.from_env({"CORRAL_WARM_POOL_SIZE": raw})
    assert str(info.value) == f"CORRAL_WARM_POOL_SIZE must be a non-negative integer, got {raw!r}"


@pytest.mark.usefixtures("as_root")
def test_images_path_defaults_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path / "data")})
    assert settings.images_dir is None
    assert settings.images_path == tmp_path / "data" / "images"
    assert Settings.from_env({}).images_path == Path("/var/lib/corral/images")


@pytest.mark.usefixtures("as_root")
def test_images_dir_override(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_IMAGES_DIR": str(tmp_path / "imgs")}
    )
    assert settings.images_dir == tmp_path / "imgs"
    assert settings.images_path == tmp_path / "imgs"
    assert Settings.from_env({"CORRAL_IMAGES_DIR": ""}).images_dir is None


@pytest.mark.usefixtures("as_root")
def test_warm_pool_size_is_read_like_the_other_integers() -> None:
    """Every other integer setting accepts " 42 " (see test_integers); the pool size should too."""
    assert Settings.from_env({"CORRAL_WARM_POOL_SIZE": " 3 "}).warm_pool_size == 3
