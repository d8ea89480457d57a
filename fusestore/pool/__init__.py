"""The pool: the files in the datadirs, with no knowledge of FUSE.

Pool settings' syntax (``config``), where a new file goes (``placement``, pure
functions), the datadirs and their health (``datadirs``), each datadir's
private area (``private``), reading datadirs (``listing``), open files that
can move (``openfiles``), and the pool itself (``pool``: lookups, placement
choice, opening, writing, renaming, unlinking), with its publication of new
files (``publish``), spill-over moves (``spillover``) and space totals
(``space``); checksums kept on each file (``checksums``), computed in the
background (``checksummer``), and extended attributes (``attributes``).

Nothing here imports the FUSE server, the service or the admin commands; a
test (``tests/test_layers.py``) holds it to that. A new placement rule goes
into ``placement``.
"""
