"""Resource IDs: shape, alphabet and the cheap prefix check."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.domain.ids import ALPHABET, ID_BODY_LENGTH, Prefix, has_prefix, new_id


def test_alphabet_is_crockford_lower_case() -> None:
    assert len(ALPHABET) == 32
    assert len(set(ALPHABET)) == 32
    assert not set("ilou") & set(ALPHABET)
    assert ALPHABET.islower()


def test_prefixes_are_distinct() -> None:
    values = [p.value for p in Prefix]
    assert len(values) == len(set(values))
    assert all("_" not in v for v in values)


def test_new_id_uses_the_injected_choice() -> None:
    chars = itertools.cycle("ab")
    assert new_id(Prefix.VM, lambda _alphabet: next(chars)) == "vm_abababababab"


@given(st.sampled_from(Prefix))
def test_new_id_shape(prefix: Prefix) -> None:
    ident = new_id(prefix)
    head, _, body = ident.partition("_")
    assert head == prefix.value
    assert len(body) == ID_BODY_LENGTH
    assert set(body) <= set(ALPHABET)
    assert has_prefix(ident, prefix)
    assert not any(has_prefix(ident, other) for other in Prefix if other is not prefix)


def test_new_ids_differ() -> None:
    assert len({new_id(Prefix.SECRET) for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("ident", "prefix", "expected"),
    [
        ("vm_k3mf9xvw2p00", Prefix.VM, True),
        ("vm_a", Prefix.VM, True),
        ("vm_" + "a" * 64, Prefix.VM, True),
        ("vm_" + "a" * 65, Prefix.VM, False),
        ("vm_", Prefix.VM, False),
        ("vm", Prefix.VM, False),
        ("", Prefix.VM, False),
        ("vmk3mf9xvw2p", Prefix.VM, False),
        ("VM_k3mf9xvw2p", Prefix.VM, False),
        ("vm_K3MF9XVW2P", Prefix.VM, False),  # upper case is not in the alphabet
        ("vm_k3mf9xvw2i", Prefix.VM, False),  # i, l, o, u are excluded
        ("vm_k3mf_9xvw2", Prefix.VM, False),
        ("vm_k3mf-9xvw2", Prefix.VM, False),
        ("sec_k3mf9xvw2p", Prefix.VM, False),
        ("egr_k3mf9xvw2p", Prefix.EGRESS_RULE, True),
        ("ee_k3mf9xvw2p", Prefix.EGRESS_RULE, False),
        ("snap_k3mf9xvw2p", Prefix.SNAPSHOT, True),
        ("key_k3mf9xvw2p", Prefix.API_KEY, True),
        (" vm_k3mf9xvw2p", Prefix.VM, False),
        ("vm_k3mf9xvw2p\n", Prefix.VM, False),
    ],
)
def test_has_prefix(ident: str, prefix: Prefix, expected: bool) -> None:
    assert has_prefix(ident, prefix) is expected


@given(st.text(max_size=80), st.sampled_from(Prefix))
def test_has_prefix_never_raises_and_implies_shape(ident: str, prefix: Prefix) -> None:
    if has_prefix(ident, prefix):
        body = ident.removeprefix(prefix.value + "_")
        assert 0 < len(body) <= 64
        assert set(body) <= set(ALPHABET)
