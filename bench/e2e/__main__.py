"""``python -m bench.e2e``: see ``bench.e2e.run``."""

from bench.e2e.run import main

raise SystemExit(main())
