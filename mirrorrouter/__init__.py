"""mirrorrouter: one container-registry mirror in front of every registry a team pulls from."""

__version__ = "0.1.0"
