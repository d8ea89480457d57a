"""The config file: README "Running it as a service", *Config file*."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fusestore.admin import status
from tests.conftest import (
    Datadir,
    MiB,
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
    ],
    ids=["bad-priority", "unknown", "bad-size", "wrong-type", "bad-bool", "syntax", "both"],
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
