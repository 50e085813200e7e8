from phased_dmd_mega.cli import main

raise SystemExit(main())
