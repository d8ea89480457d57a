"""The name index of a datadir (fusestore/pool/nameindex.py), without a mount:
what a hung datadir may hold, from its last listing and the pool's changes."""

from __future__ import annotations

import time

from fusestore.pool.nameindex import NameIndex


def test_an_index_never_listed_may_hold_every_name() -> None:
    index = NameIndex()
    assert not index.listed
    assert index.may_hold("anything")


def test_a_listing_says_which_names_are_there() -> None:
    index = NameIndex()
    index.replace([b"a", b"b", "é".encode()], listing_started=time.monotonic())
    assert index.listed and len(index) == 3
    assert index.may_hold("a") and index.may_hold("b") and index.may_hold("é")
    assert not index.may_hold("c")


def test_the_pools_own_changes_count_until_a_later_listing() -> None:
    index = NameIndex()
    index.replace([b"old"], listing_started=time.monotonic())
    index.add("new")
    index.remove("old")
    assert index.may_hold("new") and not index.may_hold("old")
    # A listing that began before the changes may not have seen them: they stay.
    index.replace([b"old"], listing_started=time.monotonic() - 60)
    assert index.may_hold("new") and not index.may_hold("old")
    # One that began after them has: its names alone count.
    index.replace([b"other"], listing_started=time.monotonic())
    assert index.may_hold("other")
    assert not index.may_hold("new") and not index.may_hold("old")


def test_a_name_removed_then_added_again_is_there() -> None:
    index = NameIndex()
    index.replace([], listing_started=time.monotonic())
    index.add("x")
    index.remove("x")
    assert not index.may_hold("x")
    index.add("x")
    assert index.may_hold("x")


def test_a_large_listing_costs_eight_bytes_a_name() -> None:
    index = NameIndex()
    names = [f"image-{n:07d}".encode() for n in range(100_000)]
    index.replace(names, listing_started=time.monotonic())
    assert len(index) == 100_000
    assert index._hashes.itemsize == 8
    assert all(index.may_hold(f"image-{n:07d}") for n in range(0, 100_000, 997))
    assert sum(index.may_hold(f"other-{n}") for n in range(10_000)) == 0
