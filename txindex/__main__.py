"""``python -m txindex``: the command line (:mod:`txindex.cli`)."""

from txindex.cli import main

raise SystemExit(main())
