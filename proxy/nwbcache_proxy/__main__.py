"""``python -m nwbcache_proxy``: the ``nwbcache`` command line (nwbcache.cli)."""

from nwbcache.cli import main

raise SystemExit(main())
