"""OpenStack Glance's filesystem store on a fusestore mount, through glance_store's real driver.

The pool is meant to be the directory Glance's ``filesystem_store_datadir``
(or one of its ``filesystem_store_datadirs``) names. These tests configure
``glance_store._drivers.filesystem.Store`` as glance-api does, through
oslo.config and the ``[glance_store]`` group, without a Glance server, and
make the calls Glance makes for an upload (``add``), a download (``get``), a
size check (``get_size``) and an image delete (``delete``).
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from glance_store import exceptions, location
from glance_store._drivers import filesystem
from oslo_config import cfg

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, files_below

# The config group of glance-api's single-store setup (no ``enabled_backends``).
GROUP = "glance_store"
# Many of the driver's 64 KiB writes; fits the 16 MiB top-priority datadir.
IMAGE_SIZE = 5 * MiB


@pytest.fixture
def glance_pool(two_datadirs: list[Datadir], mount_pool: MountFactory) -> MountedPool:
    """``fast`` (16 MiB, priority 200) and ``big`` (64 MiB, priority 100)."""
    return mount_pool(two_datadirs)


def filesystem_store(**options: object) -> filesystem.Store:
    """The driver, configured as glance-api configures it from glance-api.conf.

    Only the driver's own ``OPTIONS`` are registered: glance_store's
    ``register_opts`` loads every driver and logs a traceback for each whose
    dependencies are not installed (cinder's os_brick, ...). No config file
    is read; ``options`` are overrides in ``[glance_store]``. A bad setting
    raises instead of being logged with uploads silently disabled, as
    ``configure()`` does by default.
    """
    conf = cfg.ConfigOpts()
    conf.register_opts(filesystem.Store.OPTIONS, group=GROUP)
    conf(args=[], default_config_files=[], default_config_dirs=[])
    for name, value in options.items():
        conf.set_override(name, value, group=GROUP)
    store = filesystem.Store(conf)
    store.configure(re_raise_bsc=True)
    return store


def location_of(store: filesystem.Store, uri: str) -> location.Location:
    """The Location Glance builds from an image's stored URI (what
    ``get_location_from_uri`` does, without its process-wide scheme map)."""
    return location.Location("file", store.get_store_location_class(), store.conf, uri=uri)


def upload(
    store: filesystem.Store, pool: MountedPool, data_source: object, data: bytes
) -> tuple[str, str, str]:
    """``store.add`` an image of ``data`` and check what it returned and where
    the bytes went; its id, Glance's checksum (md5) and multihash (sha256)."""
    image_id = str(uuid.uuid4())
    uri, written, checksum, multihash, metadata = store.add(
        image_id, data_source, len(data), hashing_algo="sha256"
    )
    assert uri == f"file://{pool.path(image_id)}"
    assert written == len(data)
    assert checksum == hashlib.md5(data).hexdigest()
    assert multihash == hashlib.sha256(data).hexdigest()
    assert metadata == {}  # no filesystem_store_metadata_file
    assert pool.path(image_id).read_bytes() == data
    # One copy, in the top-priority datadir, under the image id; nothing
    # else in either datadir (no partial copy left in the private area).
    fast, big = (d.path for d in pool.datadirs)
    below = {d.path: files_below(d.path) for d in pool.datadirs}
    assert {path: list(files) for path, files in below.items()} == {fast: [image_id], big: []}
    assert below[fast][image_id] == data
    return image_id, checksum, multihash


def chunks(data: bytes, size: int = MiB) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_glance_add_get_delete_with_filesystem_store_datadir(glance_pool: MountedPool) -> None:
    """The upload lands whole in one datadir, reads back through the driver
    with the size Glance records, and a delete leaves no copy anywhere."""
    store = filesystem_store(filesystem_store_datadir=str(glance_pool.mountpoint))
    data = os.urandom(IMAGE_SIZE)
    image_id, _, _ = upload(store, glance_pool, io.BytesIO(data), data)

    image = location_of(store, f"file://{glance_pool.path(image_id)}")
    reader, size = store.get(image)
    assert size == len(data)
    assert b"".join(reader) == data
    assert store.get_size(image) == len(data)

    store.delete(image)
    assert not glance_pool.path(image_id).exists()
    assert [files_below(d.path) for d in glance_pool.datadirs] == [{}, {}]
    with pytest.raises(exceptions.NotFound):
        store.get_size(image)


def test_glance_add_with_filesystem_store_datadirs(glance_pool: MountedPool) -> None:
    """With ``filesystem_store_datadirs`` the driver picks a datadir itself,
    by ``statvfs`` of each (here the mount: the pool's summed free space),
    and refuses an image it thinks does not fit: the upload succeeding shows
    the mount reports room. The image data arrives as an iterator of chunks,
    the driver's other input form."""
    store = filesystem_store(
        # Unset, since it has a default and the driver refuses both set.
        filesystem_store_datadir=None,
        filesystem_store_datadirs=[f"{glance_pool.mountpoint}:100"],
    )
    data = os.urandom(IMAGE_SIZE)
    image_id, _, _ = upload(store, glance_pool, chunks(data), data)
    store.delete(location_of(store, f"file://{glance_pool.path(image_id)}"))
    assert [files_below(d.path) for d in glance_pool.datadirs] == [{}, {}]


def test_glance_file_perm_reaches_the_backing_file(glance_pool: MountedPool) -> None:
    """``filesystem_store_file_perm`` (read as octal) lets Nova read images
    directly; the driver chmods each new image and only logs a warning if
    that fails, so only the mode itself shows it worked."""
    store = filesystem_store(
        filesystem_store_datadir=str(glance_pool.mountpoint), filesystem_store_file_perm=640
    )
    data = os.urandom(MiB)
    image_id, _, _ = upload(store, glance_pool, io.BytesIO(data), data)
    (holder,) = glance_pool.holders(image_id)
    assert oct(os.stat(holder / image_id).st_mode & 0o7777) == oct(0o640)
    assert oct(os.stat(glance_pool.path(image_id)).st_mode & 0o7777) == oct(0o640)


def test_checksums_of_a_glance_upload_are_readable_as_xattrs(glance_pool: MountedPool) -> None:
    """The daemon's own checksums of an image equal those Glance computed
    while uploading it, readable right after ``add`` returns (a getxattr
    waits for the background checksum), and name the datadir holding it."""
    store = filesystem_store(filesystem_store_datadir=str(glance_pool.mountpoint))
    data = os.urandom(IMAGE_SIZE)
    image_id, checksum, multihash = upload(store, glance_pool, io.BytesIO(data), data)
    (holder,) = glance_pool.holders(image_id)
    path = glance_pool.path(image_id)
    assert os.getxattr(path, "user.fusestore.md5").decode() == checksum
    assert os.getxattr(path, "user.fusestore.sha256").decode() == multihash
    assert Path(os.fsdecode(os.getxattr(path, "user.fusestore.datadir"))) == holder
