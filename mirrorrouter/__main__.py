"""``python -m mirrorrouter``."""

from mirrorrouter.cli import main

raise SystemExit(main())
