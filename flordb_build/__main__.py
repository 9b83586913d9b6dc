"""``python -m flordb_build`` is the ``flordb-build`` command."""

from .cli import main

raise SystemExit(main())
