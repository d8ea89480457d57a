"""Plans to drain, balance and tier datadirs, as pure functions: no disks, no mount."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusestore.pool.rebalance import (
    Disk,
    File,
    Move,
    Plan,
    PlanError,
    default_tolerance,
    plan_balance,
    plan_drain,
    plan_fill_limit,
)

MiB = 1 << 20


def files_on(datadir: str, *sizes_mib: float, first_mtime: int = 1) -> list[File]:
    """Files named ``<datadir>-<n>``, each one newer than the one before."""
    return [
        File(f"{datadir.strip('/')}-{n}", datadir, int(size * MiB), first_mtime + n)
        for n, size in enumerate(sizes_mib)
    ]


def replay(
    disks: Sequence[Disk], files: Sequence[File], moves: Sequence[Move]
) -> tuple[list[tuple[Move, File, int]], dict[tuple[str, str], File]]:
    """Carry ``moves`` out on paper: each move with the file it takes from its
    source (as first listed) and its target's free bytes after it; and where
    every file is at the end, by (name, datadir)."""
    free = {disk.path: disk.free_bytes for disk in disks}
    where = {(f.name, f.datadir): f for f in files}
    steps = []
    for move in moves:
        file = where.pop((move.name, move.source))
        assert file.size == move.size
        assert (move.name, move.target) not in where, f"{move} overwrites a file"
        where[(move.name, move.target)] = file
        free[move.target] -= move.size
        if move.source in free:
            free[move.source] += move.size
        steps.append((move, file, free[move.target]))
    return steps, where


def free_after(disks: Sequence[Disk], plan: Plan) -> dict[str, int]:
    free = {disk.path: disk.free_bytes for disk in disks}
    for move in plan.moves:
        free[move.source] += move.size
        free[move.target] -= move.size
    return free


# Drain


def test_drain_goes_by_priority_then_free_space_and_honours_the_reserve() -> None:
    disks = [
        Disk("/a", 100, 200 * MiB, 100 * MiB, accepts=False),  # being drained
        Disk("/b", 100, 200 * MiB, 40 * MiB),
        Disk("/c", 100, 200 * MiB, 60 * MiB),
        Disk("/d", 50, 2000 * MiB, 1000 * MiB),
        Disk("/e", 300, 2000 * MiB, 2000 * MiB, accepts=False),  # retired
    ]
    files = files_on("/a", 10, 30, 8, 20)
    plan = plan_drain("/a", disks, files, reserve=16 * MiB)
    # largest first: 30 -> /c (60 free), 20 -> /b (40 free, /c has 30 <= 16 + 20),
    # 10 -> /c (30 free), 8 -> /d: /b and /c have 20 free, not more than 16 + 8
    assert [(m.size // MiB, m.target) for m in plan.moves] == [
        (30, "/c"),
        (20, "/b"),
        (10, "/c"),
        (8, "/d"),
    ]
    assert plan.bytes_by_target() == {"/c": 40 * MiB, "/b": 20 * MiB, "/d": 8 * MiB}
    assert plan.bytes_by_source() == {"/a": 68 * MiB}
    assert plan.left == ()


def test_drain_that_cannot_fit_names_the_shortfall() -> None:
    disks = [Disk("/srv/a", 100, 100 * MiB, 50 * MiB), Disk("/srv/b", 50, 100 * MiB, 26 * MiB)]
    files = files_on("/srv/a", *[2.5] * 12)
    with pytest.raises(PlanError) as raised:
        plan_drain("/srv/a", disks, files, reserve=16 * MiB)
    assert str(raised.value) == (
        "the other datadirs can take 10.0 MiB above their reserve; "
        "/srv/a holds 30.0 MiB in 12 files: 20.0 MiB short"
    )


def test_drain_with_room_in_total_but_not_in_one_piece_names_the_files() -> None:
    disks = [
        Disk("/a", 100, 100 * MiB, 50 * MiB),
        Disk("/b", 50, 100 * MiB, 26 * MiB),
        Disk("/c", 50, 100 * MiB, 26 * MiB),
    ]
    files = [File("small", "/a", 4 * MiB, 1), File("big", "/a", 12 * MiB, 2)]
    with pytest.raises(PlanError, match=r"no datadir has room for 1 file: 'big' \(12\.0 MiB\)$"):
        plan_drain("/a", disks, files, reserve=16 * MiB)


# Balance


def test_balance_moves_newest_files_up_into_an_empty_higher_disk_until_the_reserve() -> None:
    disks = [Disk("/fast", 200, 100 * MiB, 100 * MiB), Disk("/slow", 100, 1000 * MiB, 880 * MiB)]
    files = files_on("/slow", *[10] * 12)
    plan = plan_balance(disks, files, reserve=16 * MiB, tolerance=MiB)
    newest_eight = sorted(files, key=lambda f: f.mtime_ns)[-8:]
    assert {m.name for m in plan.moves} == {f.name for f in newest_eight}
    assert {m.target for m in plan.moves} == {"/fast"}
    assert free_after(disks, plan)["/fast"] == 20 * MiB  # a ninth needs more than 16 + 10


def test_balance_passes_over_a_file_too_big_for_the_room_left() -> None:
    disks = [Disk("/fast", 200, 30 * MiB, 30 * MiB), Disk("/slow", 100, 1000 * MiB, 900 * MiB)]
    files = [File("old-small", "/slow", 5 * MiB, 1), File("new-big", "/slow", 40 * MiB, 2)]
    plan = plan_balance(disks, files, reserve=16 * MiB, tolerance=MiB)
    assert plan.moves == (Move("old-small", "/slow", "/fast", 5 * MiB),)


def test_balance_evens_out_two_equal_priority_disks_to_within_tolerance() -> None:
    disks = [Disk("/a", 100, 100 * MiB, 10 * MiB), Disk("/b", 100, 100 * MiB, 90 * MiB)]
    files = files_on("/a", *[5] * 18)
    plan = plan_balance(disks, files, reserve=0, tolerance=4 * MiB)
    free = free_after(disks, plan)
    assert abs(free["/a"] - free["/b"]) <= 4 * MiB
    assert len(plan.moves) == 8
    assert {(m.source, m.target) for m in plan.moves} == {("/a", "/b")}


def test_balance_stops_when_no_file_narrows_the_gap() -> None:
    disks = [Disk("/a", 100, 100 * MiB, 16 * MiB), Disk("/b", 100, 100 * MiB, 90 * MiB)]
    files = files_on("/a", *[7] * 12)
    plan = plan_balance(disks, files, reserve=0, tolerance=MiB)
    # gap 74 -> 60 -> 46 -> 32 -> 18 -> 4 MiB: a 7 MiB file would overshoot
    assert len(plan.moves) == 5
    free = free_after(disks, plan)
    assert free["/b"] - free["/a"] == 4 * MiB


def test_balance_levels_with_the_largest_file_that_narrows_the_gap() -> None:
    disks = [Disk("/a", 100, 100 * MiB, 10 * MiB), Disk("/b", 100, 100 * MiB, 90 * MiB)]
    files = [File("thirty", "/a", 30 * MiB, 1), File("twenty", "/a", 20 * MiB, 2)]
    files.append(File("five", "/a", 5 * MiB, 3))
    plan = plan_balance(disks, files, reserve=0, tolerance=MiB)
    # gap 80: 30 fits in half of it; gap 20: 20 would overshoot, 5 does not; gap 10: none
    assert [m.name for m in plan.moves] == ["thirty", "five"]


def test_balance_levels_only_while_the_target_stays_above_the_reserve() -> None:
    disks = [Disk("/a", 100, 100 * MiB, 0), Disk("/b", 100, 100 * MiB, 20 * MiB)]
    files = files_on("/a", 10, 9)
    plan = plan_balance(disks, files, reserve=10 * MiB, tolerance=MiB)
    # 10 MiB would leave /b at the reserve, not above it
    assert [m.size for m in plan.moves] == [9 * MiB]


def test_balance_never_moves_a_file_down() -> None:
    disks = [
        Disk("/high-a", 200, 100 * MiB, 5 * MiB),
        Disk("/high-b", 200, 100 * MiB, 45 * MiB),
        Disk("/low", 100, 1000 * MiB, 1000 * MiB),
    ]
    files = files_on("/high-a", *[19] * 5) + files_on("/high-b", *[11] * 5)
    plan = plan_balance(disks, files, reserve=0, tolerance=MiB)
    assert plan.moves  # /high-a and /high-b level out
    assert {m.target for m in plan.moves} == {"/high-b"}


def test_balance_never_moves_onto_a_datadir_that_takes_no_files() -> None:
    disks = [
        Disk("/top", 300, 100 * MiB, 100 * MiB, accepts=False),
        Disk("/mid", 200, 100 * MiB, 10 * MiB),
        Disk("/mid-retired", 200, 100 * MiB, 100 * MiB, accepts=False),
        Disk("/mid-b", 200, 100 * MiB, 50 * MiB),
    ]
    files = files_on("/mid", *[9] * 10)
    plan = plan_balance(disks, files, reserve=0, tolerance=MiB)
    # the retired datadir, emptiest of all, neither takes files nor stops the others levelling
    assert [(m.source, m.target) for m in plan.moves] == [("/mid", "/mid-b")] * 2


def test_default_tolerance_is_a_percent_of_the_largest_disk_and_at_least_a_mib() -> None:
    assert default_tolerance([Disk("/a", 1, 500 << 30, 0), Disk("/b", 1, 1 << 40, 0)]) == (
        (1 << 40) // 100
    )
    assert default_tolerance([Disk("/small", 1, 32 * MiB, 0)]) == MiB
    assert default_tolerance([]) == MiB


def test_balance_without_tolerance_uses_each_priority_default() -> None:
    GiB = 1024 * MiB
    # gaps of 3 MiB and 4 GiB: over the 1 MiB default of 100 MiB disks, under
    # the 10 GiB default of 1 TiB ones (and the 1 GiB file cannot move up)
    small = [Disk("/s1", 2, 100 * MiB, 50 * MiB), Disk("/s2", 2, 100 * MiB, 53 * MiB)]
    large = [Disk("/l1", 1, 1024 * GiB, 50 * GiB), Disk("/l2", 1, 1024 * GiB, 54 * GiB)]
    files = [File("small", "/s1", MiB, 1), File("large", "/l1", GiB, 2)]
    assert [m.target for m in plan_balance(small + large, files, reserve=0).moves] == ["/s2"]
    explicit = plan_balance(small + large, files, reserve=0, tolerance=MiB)
    assert sorted(m.target for m in explicit.moves) == ["/l2", "/s2"]


# Fill limit


def test_fill_limit_moves_the_oldest_files_down_until_under_the_limit() -> None:
    disks = [Disk("/fast", 200, 100 * MiB, 10 * MiB), Disk("/slow", 100, 1000 * MiB, 900 * MiB)]
    files = files_on("/fast", *[9] * 10)
    plan = plan_fill_limit(disks, files, reserve=16 * MiB, fill_limit_percent=70)
    oldest = sorted(files, key=lambda f: f.mtime_ns)
    assert [m.name for m in plan.moves] == [f.name for f in oldest[:3]]  # 90 -> 63 MiB used
    assert {m.target for m in plan.moves} == {"/slow"}
    assert plan.left == ()


def test_fill_limit_leaves_the_files_that_fit_nowhere_below() -> None:
    disks = [Disk("/fast", 200, 100 * MiB, 10 * MiB), Disk("/slow", 100, 100 * MiB, 20 * MiB)]
    files = files_on("/fast", *[9] * 10)
    plan = plan_fill_limit(disks, files, reserve=16 * MiB, fill_limit_percent=70)
    assert plan.moves == ()
    assert plan.left == tuple(sorted(files, key=lambda f: f.mtime_ns)[:3])


def test_fill_limit_passes_files_further_down_than_a_middle_tier_at_its_limit() -> None:
    disks = [
        Disk("/fast", 300, 100 * MiB, 10 * MiB),
        Disk("/mid", 200, 100 * MiB, 50 * MiB),
        Disk("/slow", 100, 100 * MiB, 5 * MiB),  # lowest: over the limit, nowhere to go
        Disk("/slow-b", 100, 1000 * MiB, 1000 * MiB),
    ]
    files = files_on("/fast", *[10] * 9) + files_on("/mid", *[25] * 2) + files_on("/slow", 95)
    plan = plan_fill_limit(disks, files, reserve=0, fill_limit_percent=50)
    assert {m.source for m in plan.moves} == {"/fast"}
    assert {m.target for m in plan.moves} == {"/slow-b"}
    assert len(plan.moves) == 4
    assert plan.left == ()  # the lowest priority has no limit


def test_fill_limit_never_moves_a_file_up() -> None:
    disks = [
        Disk("/top", 300, 100 * MiB, 90 * MiB),
        Disk("/mid", 200, 100 * MiB, 10 * MiB),
        Disk("/low", 100, 100 * MiB, 100 * MiB, accepts=False),
    ]
    files = files_on("/mid", *[10] * 9)
    plan = plan_fill_limit(disks, files, reserve=0, fill_limit_percent=50)
    assert plan.moves == ()
    assert len(plan.left) == 4


# Properties, over random pools


@st.composite
def pools(draw: st.DrawFn) -> tuple[list[Disk], list[File]]:
    """Up to five datadirs over three priorities, their files adding up; a few
    names in two datadirs (duplicates, which a plan must not overwrite)."""
    disks: list[Disk] = []
    files: list[File] = []
    for n in range(draw(st.integers(1, 5))):
        path = f"/d{n}"
        sizes = draw(st.lists(st.integers(0, 40), max_size=6))
        for size in sizes:
            name = draw(st.sampled_from([f"f{len(files)}", "dup"]))
            if any(f.name == name and f.datadir == path for f in files):
                name = f"f{len(files)}"
            files.append(File(name, path, size, draw(st.integers(0, 10))))
        free = draw(st.integers(0, 200) | st.integers(0, 10))  # often nearly full
        total = free + sum(sizes) + draw(st.integers(0, 50))
        disks.append(Disk(path, draw(st.integers(0, 2)), total, free, draw(st.booleans())))
    return disks, files


Planner = Callable[[list[Disk], list[File], int, int], Plan]
PLANNERS: dict[str, Planner] = {
    "drain": lambda disks, files, reserve, knob: plan_drain(disks[0].path, disks, files, reserve),
    "balance": lambda disks, files, reserve, knob: plan_balance(disks, files, reserve, knob),
    "fill-limit": lambda disks, files, reserve, knob: plan_fill_limit(disks, files, reserve, knob),
}
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True)


def planned(name: str, pool: tuple[list[Disk], list[File]], reserve: int, knob: int) -> Plan:
    try:
        return PLANNERS[name](*pool, reserve, knob)
    except PlanError:
        return Plan()  # a refused drain moves nothing


@pytest.mark.parametrize("planner", PLANNERS)
@PROPERTY
@given(pool=pools(), reserve=st.integers(0, 30), knob=st.integers(0, 100))
def test_no_target_ends_at_or_below_its_reserve(
    planner: str, pool: tuple[list[Disk], list[File]], reserve: int, knob: int
) -> None:
    steps, _ = replay(*pool, planned(planner, pool, reserve, knob).moves)
    assert all(target_free > reserve for _, _, target_free in steps)


@pytest.mark.parametrize("planner", PLANNERS)
@PROPERTY
@given(pool=pools(), reserve=st.integers(0, 30), knob=st.integers(0, 100))
def test_no_file_moves_twice(
    planner: str, pool: tuple[list[Disk], list[File]], reserve: int, knob: int
) -> None:
    steps, _ = replay(*pool, planned(planner, pool, reserve, knob).moves)
    # a second move would start where the first one ended, not where the file was
    assert all(move.source == file.datadir for move, file, _ in steps)


@pytest.mark.parametrize("planner", PLANNERS)
@PROPERTY
@given(pool=pools(), reserve=st.integers(0, 30), knob=st.integers(0, 100))
def test_moves_go_only_to_other_datadirs_that_take_files(
    planner: str, pool: tuple[list[Disk], list[File]], reserve: int, knob: int
) -> None:
    accepting = {disk.path for disk in pool[0] if disk.accepts}
    for move in planned(planner, pool, reserve, knob).moves:
        assert move.target in accepting
        assert move.target != move.source


@pytest.mark.parametrize("planner", PLANNERS)
@PROPERTY
@given(pool=pools(), reserve=st.integers(0, 30), knob=st.integers(0, 100))
def test_a_plan_ends_within_one_move_per_file(
    planner: str, pool: tuple[list[Disk], list[File]], reserve: int, knob: int
) -> None:
    assert len(planned(planner, pool, reserve, knob).moves) <= len(pool[1])


@PROPERTY
@given(pool=pools(), reserve=st.integers(0, 30))
def test_drain_leaves_nothing_on_the_drained_datadir(
    pool: tuple[list[Disk], list[File]], reserve: int
) -> None:
    disks, files = pool
    drained = disks[0].path
    on_it = [f for f in files if f.datadir == drained]
    roomy = any(
        d.accepts
        and d.path != drained
        and d.free_bytes > reserve + sum(f.size for f in on_it)
        and not any(f.datadir == d.path and f.name in {g.name for g in on_it} for f in files)
        for d in disks
    )
    try:
        plan = plan_drain(drained, disks, files, reserve)
    except PlanError:
        assert not roomy, "refused although one datadir could take everything"
        return
    _, where = replay(disks, files, plan.moves)
    assert [key for key in where if key[1] == drained] == []
    assert len(plan.moves) == len(on_it)


@PROPERTY
@given(pool=pools(), reserve=st.integers(0, 30), tolerance=st.integers(0, 40))
def test_balance_never_moves_down_a_priority(
    pool: tuple[list[Disk], list[File]], reserve: int, tolerance: int
) -> None:
    priority = {disk.path: disk.priority for disk in pool[0]}
    for move in plan_balance(*pool, reserve, tolerance).moves:
        assert priority[move.target] >= priority[move.source]


@PROPERTY
@given(pool=pools(), reserve=st.integers(0, 30), percent=st.integers(0, 100))
def test_fill_limit_moves_only_down_and_only_the_oldest(
    pool: tuple[list[Disk], list[File]], reserve: int, percent: int
) -> None:
    disks, files = pool
    priority = {disk.path: disk.priority for disk in disks}
    plan = plan_fill_limit(disks, files, reserve, percent)
    for move in plan.moves:
        assert priority[move.target] < priority[move.source]
    shed = {(m.name, m.source) for m in plan.moves} | {(f.name, f.datadir) for f in plan.left}
    for file in files:
        if (file.name, file.datadir) in shed:
            older_kept = [
                f
                for f in files
                if f.datadir == file.datadir
                and (f.name, f.datadir) not in shed
                and f.mtime_ns < file.mtime_ns
            ]
            assert older_kept == [], f"{file} moved while older {older_kept} stay"
