from perfagent.cli import main

raise SystemExit(main())
