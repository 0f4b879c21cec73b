"""The ``mirrorrouter`` command (``main.py``) and its operator subcommands, each a module that
registers itself: ``resolve``, ``cache``, ``gc``, ``warm`` (with ``export`` and ``import``)."""
