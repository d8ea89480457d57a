"""The kernel's FUSE protocol: message layouts and constants, nothing else.

fusestore answers the kernel's requests on ``/dev/fuse`` itself (see
``requestloop.py`` for why). The layouts below are those of
``include/uapi/linux/fuse.h``, protocol 7.x; every one is fixed-size and
little-endian on the machines fusestore runs on (native order is used).
"""

from __future__ import annotations

import os
import struct

KERNEL_MAJOR = 7

# Opcodes fusestore answers; any other gets ENOSYS.
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
CREATE = 35
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47

OPCODE_NAMES = {
    value: name.lower()
    for name, value in list(globals().items())
    if name.isupper() and isinstance(value, int) and name != "KERNEL_MAJOR"
}

# INIT flags (the high 32 bits travel in flags2 with INIT_EXT).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
OVER_IO_URING = 1 << 41

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_KILL_SUIDGID = 1 << 11

FSYNC_FDATASYNC = 1 << 0
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
DT_DIR = 4
DT_REG = 8

# fuse_write_in.write_flags: the writer lacks CAP_FSETID, so setuid (and
# setgid with group execute) must go, as on a local filesystem. The kernel
# sets it on direct_io writes whatever was negotiated at INIT.
WRITE_KILL_SUIDGID = 1 << 2

# ioctls on /dev/fuse: _IOR(229, 0, uint32) and _IOW(229, 1/2, ...).
DEV_IOC_CLONE = 0x8004E500
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
INIT_IN = struct.Struct("=IIIII")  # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry/attr valid + nsec
ATTR_OUT_HEAD = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("=IIQ")
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("=II")
OPEN_OUT = struct.Struct("=QIi")
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
READ_IN = struct.Struct("=QQIIQII")  # also fuse_write_in
WRITE_OUT = struct.Struct("=II")
RELEASE_IN = struct.Struct("=QIIQ")
FLUSH_IN = struct.Struct("=QIIQ")
FSYNC_IN = struct.Struct("=QII")
FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
GETXATTR_IN = struct.Struct("=II")  # size padding; also fuse_listxattr's
GETXATTR_OUT = struct.Struct("=II")  # size padding: the room a value needs
# fuse_setxattr_in as sent without FUSE_SETXATTR_EXT (not negotiated): size flags
SETXATTR_IN = struct.Struct("=II")
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("=Q")
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
# fh_in off_in nodeid_out fh_out off_out len flags; answered with fuse_write_out
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")
KSTATFS = struct.Struct("=QQQQQIIII24x")
DIRENT_HEAD = struct.Struct("=QQII")  # ino off namelen type, then the name padded to 8


BACKING_MAP = struct.Struct("=iIQ")  # fd flags padding

# Notifications: an OUT_HEADER with unique 0 and the notify code as its error.
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino off len (off < 0: attributes only)

# FUSE over io_uring (uring.py): the commands of the SQE's command area
# (struct fuse_uring_cmd_req: flags, commit_id, qid) and the ring entry's
# header buffer, struct fuse_uring_req_header: in_out[128] (fuse_in_header
# on the way in, fuse_out_header on the way out), op_in[128] (the request's
# per-opcode struct), then ring_ent_in_out (flags, commit_id, payload_sz).
URING_CMD_REGISTER = 1
URING_CMD_COMMIT_AND_FETCH = 2
URING_OP_IN = 128
URING_ENT_IN_OUT = 256
URING_ENT = struct.Struct("=QQI")  # flags commit_id payload_sz
URING_PAYLOAD_SIZE = struct.Struct("=I")
URING_PAYLOAD_SIZE_AT = URING_ENT_IN_OUT + 16
URING_HEADER_SIZE = 288


def split_name(body: memoryview) -> bytes:
    """A request's file name: the bytes up to the first NUL."""
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def split_two_names(body: memoryview) -> tuple[bytes, bytes]:
    old, new, *_ = bytes(body).split(b"\0")
    return old, new


def attr_of(inode: int, st: os.stat_result, nlink: int | None = None, blksize: int = 0) -> bytes:
    """A ``fuse_attr`` for ``inode`` from a backing file's ``stat``: its own
    ``nlink`` unless given, a ``blksize`` of at least ``blksize``."""
    return ATTR.pack(
        inode,
        st.st_size,
        st.st_blocks,
        int(st.st_atime),
        int(st.st_mtime),
        int(st.st_ctime),
        st.st_atime_ns % 1_000_000_000,
        st.st_mtime_ns % 1_000_000_000,
        st.st_ctime_ns % 1_000_000_000,
        st.st_mode,
        st.st_nlink if nlink is None else nlink,
        st.st_uid,
        st.st_gid,
        0,
        max(st.st_blksize, blksize),
        0,
    )
