"""mount(8) and fstab: README "Running it as a service", *mount(8), fstab*."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fusestore.admin import status
from tests.conftest import (
    REPO,
    Datadir,
    MiB,
    daemon_pid,
    is_mounted,
    mount_env,
    mount_options,
    run_fusestore,
    wait_for_exit,
    write_config,
)


def readme_fstab_line() -> str:
    (line,) = [
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("/etc/fusestore/images.toml") and "fuse.fusestore" in line
    ]
    return line


def test_readme_fstab_line_mounts_with_mount_T(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    config = write_config(tmp_path / "images.toml", datadirs=[d.spec for d in two_datadirs])
    fields = readme_fstab_line().split()
    fields[0], fields[1] = str(config), str(mountpoint)
    fstab = tmp_path / "fstab"
    fstab.write_text(" ".join(fields) + "\n")
    subprocess.run(["mount", "-T", str(fstab), str(mountpoint)], check=True, env=mount_env())
    assert is_mounted(mountpoint)
    pid = daemon_pid(mountpoint)
    source = tmp_path / "image.raw"
    source.write_bytes(os.urandom(2 * MiB))
    subprocess.run(["cp", str(source), str(mountpoint / "image")], check=True)
    assert (two_datadirs[0].path / "image").read_bytes() == source.read_bytes()
    df = subprocess.run(["df", str(mountpoint)], capture_output=True, text=True, check=True)
    assert df.stdout.splitlines()[1].split()[0] == str(config)  # the source, as in fstab
    subprocess.run(["rm", str(mountpoint / "image")], check=True)
    assert not (two_datadirs[0].path / "image").exists()
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert not is_mounted(mountpoint)
    assert wait_for_exit(pid)


def test_mount_t_with_datadir_list_source_and_pool_options(
    mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    source = ",".join(d.spec for d in two_datadirs)
    options = "allow_other,_netdev,nofail,x-systemd.automount,min_free_space=16M,no_sync"
    subprocess.run(
        ["mount", "-t", "fuse.fusestore", source, str(mountpoint), "-o", options],
        check=True,
        env=mount_env(),
    )
    report = status.read(str(mountpoint))
    assert report["min_free_space"] == 16 * MiB and report["sync"] is False
    (mountpoint / "x").write_bytes(b"x")
    # The 16 MiB fast datadir is at the 16 MiB reserve: x goes to big.
    assert (two_datadirs[1].path / "x").exists()
    subprocess.run(["umount", str(mountpoint)], check=True)


def test_unknown_mount_option_is_refused_by_libfuse(
    mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    result = subprocess.run(
        ["mount", "-t", "fuse.fusestore", two_datadirs[0].spec, str(mountpoint), "-o", "bogus"],
        capture_output=True,
        text=True,
        env=mount_env(),
        check=False,
    )
    assert result.returncode != 0
    assert "bogus" in result.stderr
    assert not is_mounted(mountpoint)


def test_bad_pool_option_names_the_value(mountpoint: Path, two_datadirs: list[Datadir]) -> None:
    result = run_fusestore(two_datadirs[0].spec, str(mountpoint), "-o", "min_free_space=lots")
    assert result.returncode == 2
    assert "'lots'" in result.stderr
    assert not is_mounted(mountpoint)


# PATH as mount(8), fstab and systemd have it: the checkout's venv is not on it.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_setup_links_the_command_where_mount8_finds_it(tmp_path: Path, mountpoint: Path) -> None:
    link = Path("/usr/local/bin/fusestore")
    assert link.is_symlink()
    assert Path(os.readlink(link)) == REPO / ".venv" / "bin" / "fusestore"
    version = subprocess.run(
        ["fusestore", "--version"],
        env={"PATH": SYSTEM_PATH},
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.startswith("fusestore ")


def test_the_example_config_mounts_as_shipped(tmp_path: Path, mountpoint: Path, tmpfs) -> None:
    """examples/images.toml, with only its datadir paths replaced, mounted by
    mount(8) with the system's PATH (so through the /usr/local/bin link)."""
    datadirs = [tmpfs(name, 8) for name in ("fast", "big-a", "big-b")]
    text = (REPO / "examples" / "images.toml").read_text()
    for name, path in zip(("/srv/fast", "/srv/big-a", "/srv/big-b"), datadirs, strict=True):
        assert f'"{name}:' in text
        text = text.replace(f'"{name}:', f'"{path}:')
    config = tmp_path / "images.toml"
    config.write_text(text)
    subprocess.run(
        ["mount", "-t", "fuse.fusestore", str(config), str(mountpoint)],
        env={"PATH": SYSTEM_PATH},
        check=True,
        capture_output=True,
    )
    try:
        report = status.read(str(mountpoint))
        assert [(row["path"], row["priority"]) for row in report["datadirs"]] == [
            (str(datadirs[0]), 200),
            (str(datadirs[1]), 100),
            (str(datadirs[2]), 100),
        ]
        assert report["min_free_space"] == 4 << 30 and report["sync"] is True
        assert "allow_other" in mount_options(mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_datadirs_repeated_in_o_and_mount8s_own_options(
    mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    """Each ``datadirs=`` in -o adds a datadir; mount(8)'s own options are
    dropped before FUSE sees them (FUSE would refuse them)."""
    fast, big = two_datadirs
    own = "noauto,user,comment=pool,x-systemd.requires=local-fs.target,_netdev,nofail"
    options = f"datadirs={fast.spec},{own},datadirs={big.spec}"
    result = run_fusestore("none", str(mountpoint), "-o", options)
    assert result.returncode == 0, result.stderr
    try:
        report = status.read(str(mountpoint))
        assert [row["path"] for row in report["datadirs"]] == [str(fast.path), str(big.path)]
        mounted_options = mount_options(mountpoint)
        assert {"noauto", "user", "_netdev", "nofail"}.isdisjoint(mounted_options)
        assert not [o for o in mounted_options if o.startswith(("comment", "x-systemd"))]
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
