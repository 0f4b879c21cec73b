"""The ``mirrorrouter`` command (``main.py``) and its operator subcommands."""
