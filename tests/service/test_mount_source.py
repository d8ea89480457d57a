"""What mount(8), fstab and systemd hand fusestore: absolute paths, escaped commas.

README "Running it as a service" → *Paths in a source*: mount(8) runs fusestore
from any directory, so a relative datadir in the source or ``-o`` is refused;
a comma inside a path is written ``\\,``; a config file's relative paths are
taken from the file's own directory; the mounted source (``mount``, ``df``)
is the source as given, never a bare word.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    TmpfsFactory,
    is_mounted,
    mount_env,
    mounted_source,
    run_fusestore,
    write_config,
)


@pytest.mark.parametrize(
    ("source", "options", "named"),
    [
        ("/srv/{tmp}/c,d:5", [], "'d:5'"),  # the comma split it: "d" is relative
        ("rel:1", [], "'rel:1'"),
        ("/{tmp}/ok:1", ["-o", "datadirs=rel:2"], "'rel:2'"),
        ("none", ["-o", "datadirs=rel:2"], "'rel:2'"),
        ("/{tmp}/ok:1", ["-o", "log_file=daemon.log"], "'daemon.log'"),
    ],
)
def test_a_relative_path_from_mount8_is_refused_and_nothing_is_created(
    tmp_path: Path, mountpoint: Path, source: str, options: list[str], named: str
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    result = run_fusestore(source.format(tmp=tmp_path), str(mountpoint), *options, cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "absolute path" in result.stderr
    assert not is_mounted(mountpoint)
    assert os.listdir(workdir) == []


def test_a_comma_in_a_path_is_written_backslash_comma(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    odd = tmp_path / "c,d"
    odd.mkdir()
    other = Datadir(tmpfs("other", 16), 1)
    source = f"{tmp_path}/c\\,d:5,{other.spec}"
    subprocess.run(
        ["mount", "-t", "fuse.fusestore", source, str(mountpoint)],
        check=True,
        env=mount_env(),
        capture_output=True,
    )
    try:
        (mountpoint / "image").write_bytes(b"x")
        assert (odd / "image").read_bytes() == b"x"  # priority 5 wins
        assert mounted_source(mountpoint) == source  # as fstab says it: mount -a matches
        assert not (tmp_path / "c").exists() and not Path("d").exists()
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    options_form = f"datadirs={tmp_path}/c\\,d:5,datadirs={other.spec}"
    subprocess.run(
        ["mount", "-t", "fuse.fusestore", "-o", options_form, "none", str(mountpoint)],
        check=True,
        env=mount_env(),
        capture_output=True,
    )
    try:
        (mountpoint / "second").write_bytes(b"y")
        assert (odd / "second").read_bytes() == b"y"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_config_files_relative_paths_are_taken_from_its_directory(
    tmp_path: Path, mountpoint: Path
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    config = write_config(etc / "pool.toml", datadirs=["store:1"], log_file="pool.log")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_fusestore(str(config), str(mountpoint), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    try:
        (mountpoint / "image").write_bytes(b"x")
        assert (etc / "store" / "image").read_bytes() == b"x"
        assert "mounted" in (etc / "pool.log").read_text()
        assert os.listdir(elsewhere) == []
        assert mounted_source(mountpoint) == str(config)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_the_mounted_source_names_the_datadirs(tmp_path: Path, mountpoint: Path) -> None:
    """Not the bare word "fusestore", which mount helpers take for a path in
    their working directory."""
    datadir = tmp_path / "a,b"
    result = run_fusestore("mount", "--datadirs", f"{datadir}:3", str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        assert mounted_source(mountpoint) == f"{tmp_path}/a\\,b:3"
        df = subprocess.run(["df", str(mountpoint)], capture_output=True, text=True, check=True)
        assert df.stdout.splitlines()[1].startswith(f"{tmp_path}/a\\,b:3")
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_relative_source_naming_a_file_is_refused_even_with_o_datadirs(
    tmp_path: Path, mountpoint: Path
) -> None:
    """A label is a word that names nothing; a relative config file would be
    silently ignored."""
    (tmp_path / "images.toml").write_text('datadirs = ["/srv/a:1"]\n')
    result = run_fusestore(
        "images.toml", str(mountpoint), "-o", f"datadirs={tmp_path}/d:1", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "'images.toml' is a relative path" in result.stderr
    assert not is_mounted(mountpoint) and not (tmp_path / "d").exists()


def test_a_config_file_whose_datadirs_are_replaced_is_not_the_source(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    used = Datadir(tmpfs("used", 16), 1)
    config = write_config(tmp_path / "pool.toml", datadirs=[f"{tmp_path}/unused:1"])
    result = run_fusestore(
        "mount", "--config", str(config), "-o", f"datadirs={used.spec}", str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    try:
        assert mounted_source(mountpoint) == used.spec
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
