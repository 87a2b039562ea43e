from nwbcache.cli import main

raise SystemExit(main())
