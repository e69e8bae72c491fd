from distbelief.cli import main

raise SystemExit(main())
