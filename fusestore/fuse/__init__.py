"""The FUSE server: the kernel's protocol, spoken by fusestore itself.

Message layouts (``protocol``), the two transports that carry requests —
``/dev/fuse`` (``requestloop``, which also negotiates INIT and dispatches) and
FUSE over io_uring (``uring``) —, the lock that orders requests
(``requestlock``), READDIR packing (``dirents``), inode numbers (``inodes``),
and the handlers that translate each request into pool calls (``handlers``).

Only ``handlers`` knows the pool; nothing here knows how files are placed.
A new FUSE opcode goes into ``protocol`` (its layout) and ``handlers``.
"""
