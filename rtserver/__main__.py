"""`python -m rtserver` is the `rtserver` command."""

from rtserver.cli import main

raise SystemExit(main())
