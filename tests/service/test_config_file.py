"""The config file: README "Running it as a service", *Config file*."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from fusestore.admin import status
from fusestore.service.settings import SETTINGS
from tests.conftest import (
    Datadir,
    MiB,
    TmpfsFactory,
    is_mounted,
    mount_options,
    run_fusestore,
    write_config,
)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            'min_free_space = "1M"\ndatadirs = [\n  "/srv/a:1",\n  "/srv/b:high",\n]\n',
            [":4:", "datadirs", "'high'"],
        ),
        ('datadirs = ["/srv/a:1"]\nmin_free_spcae = "1G"\n', [":2:", "'min_free_spcae'"]),
        ('datadirs = ["/srv/a:1"]\n\nmin_free_space = "ten"\n', [":3:", "min_free_space", "'ten'"]),
        ('datadirs = "/srv/a:1"\n', [":1:", "datadirs", "a list of strings"]),
        ('datadirs = ["/srv/a:1"]\nno_sync = "yes"\n', [":2:", "no_sync", "true or false"]),
        ('datadirs = ["/srv/a:1"]\nmin_free_space = = 3\n', ["line 2"]),
        ('datadir = "/srv/a"\ndatadirs = ["/srv/b:1"]\n', [":2:", "not both"]),
        ('datadirs = ["/srv/a:1"]\nchecksums = ["md5", "crc32"]\n', [":2:", "'crc32'"]),
        ('datadirs = ["/srv/a:1"]\nchecksums = ["shake_128"]\n', [":2:", "'shake_128'"]),
    ],
    ids=[
        "bad-priority",
        "unknown",
        "bad-size",
        "wrong-type",
        "bad-bool",
        "syntax",
        "both",
        "bad-checksum",
        "variable-length-checksum",
    ],
)
def test_config_errors_name_file_line_and_setting(
    tmp_path: Path, mountpoint: Path, text: str, fragments: list[str]
) -> None:
    config = tmp_path / "images.toml"
    config.write_text(text)
    result = run_fusestore("mount", "--config", str(config), str(mountpoint))
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not is_mounted(mountpoint)


def test_command_line_overrides_the_config_file(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    config = write_config(
        tmp_path / "pool.toml",
        datadirs=[two_datadirs[0].spec],
        min_free_space="1M",
        options=["allow_other"],
    )
    result = run_fusestore(
        "mount", "--config", str(config), "--min-free-space", "2M", "-o", "ro", str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    report = status.read(str(mountpoint))
    assert report["min_free_space"] == 2 * MiB
    assert report["config_file"] == str(config)
    assert {"allow_other", "ro"} <= set(mount_options(mountpoint))


@pytest.mark.parametrize("form", ["--datadirs", "--datadir", "-o datadirs"])
def test_a_datadir_list_on_the_command_line_replaces_the_files(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir], form: str
) -> None:
    fast, big = two_datadirs
    config = write_config(tmp_path / "pool.toml", datadirs=[fast.spec], min_free_space="1M")
    given = {
        "--datadirs": ["--datadirs", big.spec],
        "--datadir": ["--datadir", str(big.path)],
        "-o datadirs": ["-o", f"datadirs={big.spec}"],
    }[form]
    result = run_fusestore("mount", "--config", str(config), *given, str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        report = status.read(str(mountpoint))
        assert [row["path"] for row in report["datadirs"]] == [str(big.path)]
        assert report["min_free_space"] == 1 * MiB  # the rest of the file still applies
        (mountpoint / "image").write_bytes(b"x")
        assert (big.path / "image").exists() and not (fast.path / "image").exists()
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_metadata_file_is_checked_and_shown(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    metadata = tmp_path / "metadata.json"
    metadata.write_text('{"mountpoint": "/var/lib/images"}')
    args = ["--datadirs", two_datadirs[0].spec, "--metadata-file", str(metadata)]
    result = run_fusestore("mount", *args, str(mountpoint))
    assert result.returncode == 2 and "'id'" in result.stderr
    metadata.write_text('{"id": "store-1", "mountpoint": "/var/lib/images"}')
    result = run_fusestore("mount", *args, str(mountpoint))
    assert result.returncode == 0, result.stderr
    report = status.read(str(mountpoint))
    assert report["metadata"] == {"id": "store-1", "mountpoint": "/var/lib/images"}


# Every setting of fusestore/service/settings.py SETTINGS, each given a value
# that is not its default, in each of its forms: the config file's key, -o
# key=value, and the command-line flag (options has none: its -o form is the
# FUSE options themselves).
COVERED_SETTINGS = {
    "datadir",
    "datadirs",
    "min_free_space",
    "no_sync",
    "checksums",
    "thin_provisioning",
    "passthrough_headroom",
    "datadir_timeout",
    "busy_poll",
    "transport",
    "no_io_uring",  # transport = "devfuse" by its older name
    "metadata_file",
    "log_file",
    "debug",
    "options",
}
METADATA = {"id": "store-1", "mountpoint": "/var/lib/images"}


def test_every_setting_is_covered_below() -> None:
    assert set(SETTINGS) == COVERED_SETTINGS


def every_setting(form: str, pool_key: str, pool: list[str], paths: dict[str, str]) -> list[str]:
    """The arguments that give the pool (``datadir`` or ``datadirs``) and every
    other setting a value that is not its default, in ``form``."""
    if form == "flags":
        flag = f"--{pool_key}"
        return [
            *(arg for value in pool for arg in (flag, value)),
            *("--min-free-space", "1M", "--no-sync", "--busy-poll", "7"),
            *("--transport", "devfuse"),
            *("--checksums", "sha1", "--thin-provisioning", "--datadir-timeout", "3.5"),
            *("--passthrough-headroom", "2G"),
            *("--metadata-file", paths["metadata_file"], "--log-file", paths["log_file"]),
            *("--debug", "-o", "allow_other"),
        ]
    if form == "-o":
        options = [
            *(f"{pool_key}={value}" for value in pool),
            *("min_free_space=1M", "no_sync=true", "busy_poll=7", "transport=devfuse"),
            "checksums=sha1",
            "thin_provisioning",
            "datadir_timeout=3.5s",
            "passthrough_headroom=2G",
            f"metadata_file={paths['metadata_file']}",
            f"log_file={paths['log_file']}",
            *("debug=true", "allow_other"),
        ]
        return ["-o", ",".join(options)]
    config = write_config(
        Path(paths["config"]),
        **{pool_key: pool[0] if pool_key == "datadir" else pool},
        min_free_space="1M",
        no_sync=True,
        checksums=["sha1"],
        thin_provisioning=True,
        datadir_timeout=3.5,
        passthrough_headroom="2G",
        busy_poll=7,
        no_io_uring=True,
        metadata_file=paths["metadata_file"],
        log_file=paths["log_file"],
        debug=True,
        options=["allow_other"],
    )
    return ["--config", str(config)]


@pytest.mark.parametrize("pool_key", ["datadir", "datadirs"])
@pytest.mark.parametrize("form", ["file", "-o", "flags"])
def test_every_setting_works_in_every_form(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory, form: str, pool_key: str
) -> None:
    """README *Config file*: a setting has the same name in the file, as -o
    name=value and as --name value; each one reaches the mount."""
    if pool_key == "datadir":
        only = tmpfs("only", 16)
        pool, expected_rows = [str(only)], [(str(only), 0)]
    else:
        fast, big = tmpfs("fast", 16), tmpfs("big", 16)
        pool, expected_rows = [f"{fast}:2", f"{big}:1"], [(str(fast), 2), (str(big), 1)]
    metadata, log_file = tmp_path / "metadata.json", tmp_path / "daemon.log"
    metadata.write_text(json.dumps(METADATA))
    paths = {
        "metadata_file": str(metadata),
        "log_file": str(log_file),
        "config": str(tmp_path / "pool.toml"),
    }
    result = run_fusestore("mount", *every_setting(form, pool_key, pool, paths), str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        report = status.read(str(mountpoint))
        assert [(row["path"], row["priority"]) for row in report["datadirs"]] == expected_rows
        assert report["min_free_space"] == 1 * MiB
        assert report["sync"] is False  # no_sync
        assert report["thin_provisioning"] is True
        assert report["datadir_timeout"] == 3.5
        assert report["passthrough_headroom"] == 2 << 30
        assert report["io_uring_queues"] == 0  # transport, no_io_uring in the file
        assert (report["transport"]["chosen"], report["transport"]["why"]) == ("devfuse", "set")
        assert report["metadata"] == METADATA
        assert "allow_other" in mount_options(mountpoint)  # options
        (mountpoint / "image").write_bytes(b"x")
        log = log_file.read_text()  # log_file
        (mounted,) = [line for line in log.splitlines() if " INFO mounted " in line]
        ending = ", no fsync (--no-sync), checksums sha1, busy_poll 7 µs, datadir_timeout 3.5 s"
        assert mounted.endswith(ending), mounted
        sha1 = hashlib.sha1(b"x").hexdigest()
        assert os.getxattr(mountpoint / "image", "user.fusestore.sha1").decode() == sha1
        assert " DEBUG create(" in log  # debug
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
