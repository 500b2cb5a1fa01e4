from martlet.cli import main

raise SystemExit(main())
