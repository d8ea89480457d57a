"""``python -m fusestore`` is the ``fusestore`` command."""

from fusestore.cli import main

raise SystemExit(main())
