from nwc.cli import main

raise SystemExit(main())
