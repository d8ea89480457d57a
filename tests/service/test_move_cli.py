"""``fusestore drain`` and ``balance``, the client side: docs/operations.md.

The rendering of the daemon's events (lines, summary, JSON document, exit
status) is fed lists of events here; the client of the control socket is
fed bytes by a stand-in daemon; the command line is run as a user would,
without a pool. Moves through a real mount: tests/mount/test_moves.py.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusestore.admin import move, status
from tests.conftest import run_fusestore

MiB = 1 << 20
MOUNTPOINT = "/var/lib/images"

PLAN = {
    "event": "plan",
    "files": 3,
    "bytes": 30 * MiB,
    "by_target": {"/srv/b": 20 * MiB, "/srv/c": 10 * MiB},
    "moves": [
        {"name": "one", "source": "/srv/a", "target": "/srv/b", "size": 12 * MiB},
        {"name": "two", "source": "/srv/a", "target": "/srv/c", "size": 10 * MiB},
        {"name": "three", "source": "/srv/a", "target": "/srv/b", "size": 8 * MiB},
    ],
}
MOVED_ONE = {"event": "moved", **PLAN["moves"][0]}
MOVED_TWO = {"event": "moved", **PLAN["moves"][1]}
SKIPPED_THREE = {"event": "skipped", "name": "three", "source": "/srv/a", "why": "open for writing"}


def done(moved: int, skipped: int, copied: int, seconds: float, dry_run: bool = False) -> dict:
    return {
        "event": "done",
        "moved": moved,
        "skipped": skipped,
        "bytes": copied,
        "seconds": seconds,
        "dry_run": dry_run,
    }


def shown(
    events: list[dict[str, Any]], *, dry_run: bool = False, as_json: bool = False
) -> tuple[str, str, int]:
    """What the command prints (stdout, stderr) off a terminal, and its exit status."""
    out, err = io.StringIO(), io.StringIO()
    display = move.Display("drain", dry_run=dry_run, as_json=as_json, out=out, err=err)
    move.follow(iter(events), display)
    code = display.finish(MOUNTPOINT)
    return out.getvalue(), err.getvalue(), code


# ---------------------------------------------------------------- rendering


def test_each_file_moved_or_skipped_gets_a_line_then_a_summary() -> None:
    events = [
        PLAN,
        {"event": "progress", "bytes": 5 * MiB, "files": 0},
        MOVED_ONE,
        MOVED_TWO,
        SKIPPED_THREE,
        done(2, 1, 22 * MiB, 2.0),
    ]
    out, err, code = shown(events)
    assert out.splitlines() == [
        "plan: 3 files (30.0M): 20.0M to /srv/b, 10.0M to /srv/c",
        "moved: 'one' /srv/a -> /srv/b (12.0M)",
        "moved: 'two' /srv/a -> /srv/c (10.0M)",
        "skipped: 'three' in /srv/a: open for writing",
        "done: 2 files moved (22.0M in 2.0 s, 11.0M/s), 1 skipped",
    ]
    assert err == ""
    assert code == 1  # a file was skipped


def test_a_run_that_moved_everything_exits_0() -> None:
    events = [PLAN, MOVED_ONE, MOVED_TWO, {"event": "moved", **PLAN["moves"][2]}]
    out, err, code = shown([*events, done(3, 0, 30 * MiB, 4.0)])
    assert out.splitlines()[-1] == "done: 3 files moved (30.0M in 4.0 s, 7.5M/s), 0 skipped"
    assert (err, code) == ("", 0)


def test_the_summary_names_size_time_and_rate() -> None:
    summary = move.summary_line(done(12, 1, 1400 * MiB, 4.0))
    assert summary == "done: 12 files moved (1.4G in 4.0 s, 350.0M/s), 1 skipped"
    assert move.summary_line(done(1, 0, 0, 0.0)) == "done: 1 file moved (0B in 0.0 s), 0 skipped"


def test_nothing_to_move_is_said_and_exits_0() -> None:
    empty = {"event": "plan", "files": 0, "bytes": 0, "by_target": {}, "moves": []}
    out, err, code = shown([empty, done(0, 0, 0, 0.01)])
    assert out.splitlines()[0] == "plan: nothing to move"
    assert (err, code) == ("", 0)
    assert shown([empty, done(0, 0, 0, 0.0, dry_run=True)], dry_run=True)[0] == (
        "dry run: nothing to move\n"
    )


def test_a_dry_run_prints_each_move_then_bytes_per_target_and_exits_0() -> None:
    out, err, code = shown([PLAN, done(0, 0, 0, 0.0, dry_run=True)], dry_run=True)
    assert out.splitlines() == [
        "'one': /srv/a -> /srv/b (12.0M)",
        "'two': /srv/a -> /srv/c (10.0M)",
        "'three': /srv/a -> /srv/b (8.0M)",
        "to /srv/b: 20.0M (2 files)",
        "to /srv/c: 10.0M (1 file)",
        "dry run: 3 files (30.0M) would move; nothing was changed",
    ]
    assert (err, code) == ("", 0)


def test_json_is_one_document_of_the_plan_the_files_and_the_summary() -> None:
    events = [PLAN, MOVED_ONE, MOVED_TWO, SKIPPED_THREE, done(2, 1, 22 * MiB, 2.0)]
    out, err, code = shown(events, as_json=True)
    document = json.loads(out)
    assert document == {
        "version": 1,
        "command": "drain",
        "plan": {key: value for key, value in PLAN.items() if key != "event"},
        "moved": [PLAN["moves"][0], PLAN["moves"][1]],
        "skipped": [{"name": "three", "source": "/srv/a", "why": "open for writing"}],
        "summary": {"moved": 2, "skipped": 1, "bytes": 22 * MiB, "seconds": 2.0, "dry_run": False},
    }
    assert (err, code) == ("", 1)


def test_a_dry_run_in_json_has_the_plan_and_nothing_moved() -> None:
    out, _, code = shown([PLAN, done(0, 0, 0, 0.0, dry_run=True)], dry_run=True, as_json=True)
    document = json.loads(out)
    assert document["plan"]["files"] == 3 and document["moved"] == []
    assert document["summary"]["dry_run"] is True
    assert code == 0


def test_a_daemon_that_goes_away_before_done_is_named_and_exits_1() -> None:
    out, err, code = shown([PLAN, MOVED_ONE])
    assert out.splitlines()[-1] == "moved: 'one' /srv/a -> /srv/b (12.0M)"
    assert err.startswith(f"fusestore: the daemon serving {MOUNTPOINT} went away before the drain")
    assert "1 of 3 files moved" in err and "rerun" in err and len(err.splitlines()) == 1
    assert code == 1
    out, _, code = shown([PLAN, MOVED_ONE], as_json=True)
    document = json.loads(out)
    assert document["summary"] is None and len(document["moved"]) == 1
    assert code == 1


def test_a_refusal_is_one_line_on_stderr_and_exits_2() -> None:
    refused = {"event": "refused", "message": "the other datadirs can take 3 MiB: 9 MiB short"}
    for as_json in (False, True):
        out, err, code = shown([refused], as_json=as_json)
        assert out == ""
        assert err == "fusestore: drain refused: the other datadirs can take 3 MiB: 9 MiB short\n"
        assert code == 2


def test_a_job_the_daemon_stopped_early_exits_1_naming_the_files_not_tried() -> None:
    out, err, code = shown([PLAN, MOVED_ONE, done(1, 0, 12 * MiB, 1.0)])
    assert out.splitlines()[-1].startswith("done: 1 file moved")
    assert "2 files not tried" in err
    assert code == 1


def test_events_of_unknown_kinds_are_passed_over() -> None:
    events = [PLAN, {"event": "pondering", "what": "x"}, MOVED_ONE, MOVED_TWO, SKIPPED_THREE]
    out, _, code = shown([*events, done(2, 1, 22 * MiB, 2.0)])
    assert "pondering" not in out and code == 1


def test_on_a_terminal_a_bar_shows_progress_and_only_skipped_files_get_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    display = move.Display("drain", bar=True, out=out, err=io.StringIO())
    events = [
        PLAN,
        {"event": "progress", "bytes": 6 * MiB, "files": 0},
        MOVED_ONE,
        MOVED_TWO,
        SKIPPED_THREE,
        done(2, 1, 22 * MiB, 2.0),
    ]
    move.follow(iter(events), display)
    assert display.finish(MOUNTPOINT) == 1
    assert out.getvalue().splitlines() == [
        "plan: 3 files (30.0M): 20.0M to /srv/b, 10.0M to /srv/c",
        "skipped: 'three' in /srv/a: open for writing",
        "done: 2 files moved (22.0M in 2.0 s, 11.0M/s), 1 skipped",
    ]
    bar = capsys.readouterr().err  # tqdm draws on the real stderr
    assert "drain" in bar and "3/3 files" in bar
    assert "22.0M/22.0M" in bar  # the skipped file's bytes left the total


def test_ctrl_c_hangs_up_and_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    hung_up = []

    def events() -> Iterator[dict[str, Any]]:
        try:
            yield PLAN
            yield MOVED_ONE
            raise KeyboardInterrupt
        finally:
            hung_up.append(True)

    monkeypatch.setattr(status, "request", lambda mountpoint, message: events())
    out, err = io.StringIO(), io.StringIO()
    code = move.run(MOUNTPOINT, move.drain_request("/srv/a"), out=out, err=err)
    assert code == 130 and hung_up == [True]
    assert "moved: 'one'" in out.getvalue() and "done:" not in out.getvalue()
    assert err.getvalue().startswith("fusestore: drain stopped: 1 of 3 files moved")


def test_requests_carry_bytes_per_second_and_the_options() -> None:
    assert move.drain_request("/srv/a", dry_run=True, rate_mib=1.5) == {
        "command": "drain",
        "datadir": "/srv/a",
        "dry_run": True,
        "rate": 3 * MiB // 2,
    }
    assert move.balance_request(tolerance=5 * MiB, fill_limit=80) == {
        "command": "balance",
        "dry_run": False,
        "rate": None,
        "tolerance": 5 * MiB,
        "fill_limit": 80,
    }


# --------------------------------------------------------- status of a job


def status_report(job: dict[str, Any] | None, state: str = "ok") -> dict[str, Any]:
    row = {
        "path": "/srv/a",
        "priority": 1,
        "state": state,
        "size_bytes": 0,
        "free_bytes": 0,
        "files": 0,
        "file_bytes": 0,
    }
    totals = {"size_bytes": 0, "free_bytes": 0, "files": 0, "file_bytes": 0, "names": 0}
    return {"min_free_space": 0, "sync": True, "datadirs": [row], "totals": totals, "job": job}


def test_the_status_table_shows_a_running_drain_and_a_draining_datadir() -> None:
    job = {
        "command": "drain",
        "datadir": "/srv/a",
        "files_done": 3,
        "files": 10,
        "bytes_done": 123,
        "bytes": 4567,
        "started": "2026-11-28T08:00:00Z",
    }
    table = status.render_table(status_report(job, state="draining"))
    assert table.splitlines()[-1] == (
        "draining /srv/a: 3/10 files, 123B/4.5K, started 2026-11-28T08:00:00Z"
    )
    assert re.search(r"^/srv/a\s+1\s+draining\s", table, re.MULTILINE)


def test_the_status_table_shows_a_running_balance_and_nothing_without_a_job() -> None:
    job = {"command": "balance", "datadir": None, "files_done": 0, "files": 2}
    job |= {"bytes_done": 0, "bytes": 2 * MiB}
    assert status.render_table(status_report(job)).splitlines()[-1] == (
        "balancing: 0/2 files, 0B/2.0M"
    )
    quiet = status.render_table(status_report(None))
    assert "balancing" not in quiet and "draining" not in quiet


# ------------------------------------------- the control socket, as a client


@pytest.fixture
def daemon_saying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[list[bytes]], tuple[list[Any], bytes]]]:
    """``daemon_saying(chunks)``: a stand-in daemon on "/" (a mountpoint) sends
    ``chunks`` and hangs up; the events the client decoded (or the error it
    raised, last) and the request it sent."""
    path = str(tmp_path / "control.sock")
    monkeypatch.setattr(status, "socket_paths", lambda mountpoint: [path])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    threads: list[threading.Thread] = []

    def talk(chunks: list[bytes]) -> tuple[list[Any], bytes]:
        received = []

        def serve() -> None:
            connection, _ = server.accept()
            with connection:
                received.append(connection.recv(4096))
                for chunk in chunks:
                    connection.sendall(chunk)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        found: list[Any] = []
        try:
            found.extend(status.request("/", {"command": "balance"}))
        except status.NotAPool as exc:
            found.append(exc)
        thread.join(10)
        return found, received[0]

    yield talk
    server.close()


def test_the_client_sends_one_json_line_and_decodes_lines_however_they_are_cut(
    daemon_saying: Callable[[list[bytes]], tuple[list[Any], bytes]],
) -> None:
    stream = b'{"event": "plan", "files": 0}\n\n{"event": "done", "moved": 0}\n'
    events, request = daemon_saying([stream[:5], stream[5:33], stream[33:]])
    assert request == b'{"command": "balance"}\n'
    assert events == [{"event": "plan", "files": 0}, {"event": "done", "moved": 0}]


def test_a_line_cut_short_by_a_dying_daemon_is_dropped(
    daemon_saying: Callable[[list[bytes]], tuple[list[Any], bytes]],
) -> None:
    events, _ = daemon_saying([b'{"event": "plan", "files": 1}\n{"event": "mov'])
    assert events == [{"event": "plan", "files": 1}]


def test_a_daemon_older_than_the_command_is_named(
    daemon_saying: Callable[[list[bytes]], tuple[list[Any], bytes]],
) -> None:
    events, _ = daemon_saying([json.dumps({"version": 1, "datadirs": []}, indent=2).encode()])
    assert len(events) == 1 and isinstance(events[0], status.NotAPool)
    assert "predates this command" in str(events[0])


# ---------------------------------------------------------- the command line


def test_drain_of_something_not_a_pool_exits_2_naming_it(tmp_path: Path) -> None:
    for command in (["drain", str(tmp_path), str(tmp_path / "a")], ["balance", str(tmp_path)]):
        result = run_fusestore(*command)
        assert result.returncode == 2
        assert (
            result.stderr == f"fusestore: {tmp_path} is not a fusestore mount (not a mountpoint)\n"
        )
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rate", "0"),
        ("--rate", "-5"),
        ("--rate", "fast"),
        ("--fill-limit", "0"),
        ("--fill-limit", "101"),
        ("--fill-limit", "50.5"),
        ("--tolerance", "5Q"),
    ],
)
def test_a_bad_option_value_exits_2_naming_it(tmp_path: Path, option: str, value: str) -> None:
    result = run_fusestore("balance", str(tmp_path), option, value)
    assert result.returncode == 2
    assert option in result.stderr and repr(value) in result.stderr
    assert len(result.stderr.splitlines()) == 1
    if option == "--rate":
        drained = run_fusestore("drain", str(tmp_path), "/srv/a", option, value)
        assert drained.returncode == 2 and option in drained.stderr


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["drain", "balance"]),
        (
            ["drain"],
            ["DATADIR", "placement", "no new files", "reload", "--dry-run", "--rate", "Ctrl-C"],
        ),
        (
            ["balance"],
            ["--tolerance", "1% of the largest", "--fill-limit", "least recently modified"],
        ),
    ],
)
def test_drain_and_balance_explain_themselves(command: list[str], expected: list[str]) -> None:
    result = run_fusestore(*command, "--help")
    assert result.returncode == 0 and result.stderr == ""
    text = re.sub(r"\s+", " ", result.stdout)
    for fragment in expected:
        assert fragment in text
