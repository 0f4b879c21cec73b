"""``python -m mirrorrouter``."""

from mirrorrouter.cli.main import main

raise SystemExit(main())
