"""Placement as a pure function: README "How it behaves" → *Placement*."""

from __future__ import annotations

from fusestore.pool.placement import DatadirSpace, choose_datadir, lookup_order

MiB = 1 << 20


def space(path: str, priority: int, free_mib: float) -> DatadirSpace:
    return DatadirSpace(path, priority, int(free_mib * MiB))


def test_highest_priority_wins_even_with_less_free_space() -> None:
    datadirs = [space("/big", 50, 1000), space("/fast", 100, 10)]
    assert choose_datadir(datadirs, 0).path == "/fast"


def test_most_free_space_wins_within_a_priority() -> None:
    datadirs = [space("/a", 100, 32), space("/b", 100, 48), space("/c", 50, 256)]
    assert choose_datadir(datadirs, 16 * MiB).path == "/b"


def test_tie_in_free_space_goes_to_the_datadir_given_first() -> None:
    datadirs = [space("/first", 7, 10), space("/second", 7, 10)]
    assert choose_datadir(datadirs, 0).path == "/first"
    assert choose_datadir(list(reversed(datadirs)), 0).path == "/second"


def test_datadir_at_or_below_reserve_takes_no_new_file() -> None:
    datadirs = [space("/at-reserve", 100, 16), space("/low", 50, 17)]
    assert choose_datadir(datadirs, 16 * MiB).path == "/low"


def test_known_size_counts_on_top_of_reserve() -> None:
    datadirs = [space("/a", 100, 20), space("/b", 50, 40)]
    assert choose_datadir(datadirs, 16 * MiB, needed_bytes=0).path == "/a"
    assert choose_datadir(datadirs, 16 * MiB, needed_bytes=4 * MiB).path == "/b"


def test_full_top_priority_falls_through_to_next_tier() -> None:
    datadirs = [space("/p3", 3, 0), space("/p2", 2, 0), space("/p1", 1, 5)]
    assert choose_datadir(datadirs, 0).path == "/p1"


def test_everything_full_means_no_datadir() -> None:
    datadirs = [space("/a", 1, 1), space("/b", 0, 2)]
    assert choose_datadir(datadirs, 2 * MiB) is None
    assert choose_datadir([], 0) is None


def test_reference_sequence_of_four_20mib_files() -> None:
    """The issue's check: 32+48 MiB at 100, 256 MiB at 50, 16 MiB reserve."""
    free = {"/32": 32.0, "/48": 48.0, "/256": 256.0}
    priority = {"/32": 100, "/48": 100, "/256": 50}
    landed = []
    for _ in range(4):
        datadirs = [space(path, priority[path], free[path]) for path in free]
        chosen = choose_datadir(datadirs, 16 * MiB)
        assert chosen is not None
        landed.append(chosen.path)
        free[chosen.path] -= 20
    assert landed == ["/48", "/32", "/48", "/256"]


def test_lookup_order_is_priority_then_given_order() -> None:
    datadirs = [space("/a", 1, 0), space("/b", 5, 0), space("/c", 1, 0), space("/d", 5, 0)]
    assert [d.path for d in lookup_order(datadirs)] == ["/b", "/d", "/a", "/c"]
