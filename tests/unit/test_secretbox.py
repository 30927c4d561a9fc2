"""Secrets at rest: AES-GCM bound to its row, a plaintext wrapper that never shows itself, the key file."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.security.secretbox import AesGcmCipher, DecryptionFailed, SecretValue, load_or_create_key

KEY = bytes(range(32))
PLAIN = "sk-live-0123456789abcdef"


@pytest.fixture
def cipher() -> AesGcmCipher:
    return AesGcmCipher(KEY)


# --- SecretValue ----------------------------------------------------------------------------------------


def test_reveal() -> None:
    assert SecretValue(PLAIN).reveal() == PLAIN


@dataclass
class _Holder:
    name: str
    value: SecretValue


@pytest.mark.parametrize(
    "render",
    [
        repr,
        str,
        lambda s: f"{s}",
        lambda s: f"{s!r}",
        lambda s: f"{s!s}",
        lambda s: "%s %r" % (s, s),  # noqa: UP031
        lambda s: "{} {!r}".format(s, s),  # noqa: UP032
        format,
        lambda s: repr([s, {"k": s}, (s,)]),
        lambda s: repr(_Holder("openai", s)),
        lambda s: str(ValueError(s)),
    ],
)
def test_secret_value_never_renders_its_value(render: Callable[[SecretValue], str]) -> None:
    text = render(SecretValue(PLAIN))
    assert PLAIN not in text
    assert "**" in text


def test_secret_value_is_not_in_log_records(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("corral.test.secretbox")
    secret = SecretValue(PLAIN)
    with caplog.at_level(logging.DEBUG, logger="corral.test.secretbox"):
        log.info("value %s / %r", secret, secret)
        log.info("dict %s", {"secret": secret})
        log.info(secret)
        try:
            raise RuntimeError(secret)
        except RuntimeError:
            log.exception("failed with %s", secret)
    assert len(caplog.records) == 4
    assert PLAIN not in caplog.text
    assert all(PLAIN not in record.getMessage() for record in caplog.records)


def test_secret_value_has_no_instance_dict() -> None:
    with pytest.raises(TypeError):
        vars(SecretValue(PLAIN))
    with pytest.raises(AttributeError):
        SecretValue(PLAIN).other = 1  # type: ignore[attr-defined]


def test_secret_value_format_spec_does_not_leak() -> None:
    with pytest.raises(TypeError):
        format(SecretValue(PLAIN), "s")


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_secret_value_equality_and_hash(a: str, b: str) -> None:
    assert SecretValue(a) == SecretValue(a)
    assert hash(SecretValue(a)) == hash(SecretValue(a))
    assert (SecretValue(a) == SecretValue(b)) is (a == b)
    assert SecretValue(a) != a


@pytest.mark.parametrize("text", ["pässwörd", "ascii"])
def test_secret_value_equality_with_non_ascii(text: str) -> None:
    # secrets.compare_digest() refuses non-ASCII str, so a non-ASCII secret must be compared as bytes.
    assert SecretValue(text) == SecretValue(text)
    assert SecretValue(text) != SecretValue(text + "x")


# --- AesGcmCipher ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        AesGcmCipher(b"k" * size)


def test_cipher_repr_hides_the_key(cipher: AesGcmCipher) -> None:
    assert KEY.hex() not in repr(cipher)
    assert repr(KEY) not in repr(cipher)
    assert "hidden" in repr(cipher)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=500), st.text(max_size=40))
def test_round_trip(value: str, context: str) -> None:
    box = AesGcmCipher(KEY)
    blob = box.encrypt(SecretValue(value), context)
    assert box.decrypt(blob, context).reveal() == value
    assert value.encode() not in blob or len(value) < 4


def test_ciphertext_is_versioned_and_fresh(cipher: AesGcmCipher) -> None:
    one = cipher.encrypt(SecretValue(PLAIN), "sec_1:usr_1")
    two = cipher.encrypt(SecretValue(PLAIN), "sec_1:usr_1")
    assert one[:1] == b"\x01"
    assert one != two  # a fresh nonce each time
    assert len(one) == 1 + 12 + len(PLAIN.encode()) + 16
    assert PLAIN.encode() not in one


@pytest.mark.parametrize("other", ["sec_2:usr_1", "sec_1:usr_2", "", "sec_1:usr_1 ", "SEC_1:usr_1"])
def test_wrong_context_fails(cipher: AesGcmCipher, other: str) -> None:
    blob = cipher.encrypt(SecretValue(PLAIN), "sec_1:usr_1")
    with pytest.raises(DecryptionFailed, match="does not match"):
        cipher.decrypt(blob, other)


def test_wrong_key_fails(cipher: AesGcmCipher) -> None:
    blob = cipher.encrypt(SecretValue(PLAIN), "ctx")
    with pytest.raises(DecryptionFailed):
        AesGcmCipher(bytes(32)).decrypt(blob, "ctx")


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_tampered_byte_fails(data: st.DataObject) -> None:
    box = AesGcmCipher(KEY)
    blob = bytearray(box.encrypt(SecretValue(PLAIN), "ctx"))
    index = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    blob[index] ^= flip
    with pytest.raises(DecryptionFailed):
        box.decrypt(bytes(blob), "ctx")


@pytest.mark.parametrize("cut", [0, 1, 12, 13, 28])
def test_truncated_ciphertext_fails(cipher: AesGcmCipher, cut: int) -> None:
    blob = cipher.encrypt(SecretValue(""), "ctx")
    assert len(blob) == 29
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(blob[:cut], "ctx")


def test_extended_ciphertext_fails(cipher: AesGcmCipher) -> None:
    blob = cipher.encrypt(SecretValue(PLAIN), "ctx")
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(blob + b"\x00", "ctx")


@pytest.mark.parametrize("blob", [b"", b"\x00" * 40, b"\x02" + bytes(40), b"plaintext secret value here!!"])
def test_garbage_fails_cleanly(cipher: AesGcmCipher, blob: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(blob, "ctx")


# --- the key file ---------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 000, so the modes asserted are the ones the code asks for, not the umask's."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_key_file_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "secret.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert path.read_bytes() == key
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no temporary file left


def test_key_file_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    assert load_or_create_key(path) == load_or_create_key(path)


def test_keys_differ_between_installations(tmp_path: Path) -> None:
    assert load_or_create_key(tmp_path / "a.key") != load_or_create_key(tmp_path / "b.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o610, 0o601])
def test_refuses_a_key_file_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(SystemExit, match="chmod 600"):
        load_or_create_key(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_accepts_an_owner_only_key_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(KEY)
    path.chmod(mode)
    assert load_or_create_key(path) == KEY


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_refuses_a_key_of_the_wrong_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(SystemExit, match="32-byte key"):
        load_or_create_key(path)


def test_concurrent_creation_yields_one_key(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secret.key"
    workers = 16
    barrier = threading.Barrier(workers)
    keys: list[bytes] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def start() -> None:
        barrier.wait()
        try:
            key = load_or_create_key(path)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            keys.append(key)

    threads = [threading.Thread(target=start) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert len(keys) == workers
    assert len(set(keys)) == 1
    assert path.read_bytes() == keys[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]


def test_encrypt_of_a_lone_surrogate_is_not_a_silent_success(cipher: AesGcmCipher) -> None:
    # Documents today's behaviour: the cipher cannot encode it; validation must stop it first
    # (see test_validation.test_text_that_cannot_be_utf8_encoded_is_rejected).
    with pytest.raises(UnicodeEncodeError):
        cipher.encrypt(SecretValue("\ud800"), "ctx")
