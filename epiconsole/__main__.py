from epiconsole.cli import main

raise SystemExit(main())
