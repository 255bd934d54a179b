from musefm.cli import main

raise SystemExit(main())
