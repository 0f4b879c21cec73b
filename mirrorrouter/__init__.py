"""mirrorrouter: one container-registry mirror in front of every registry a team pulls from.

The folders are the path a request takes (docs/architecture.md draws it): ``server/`` runs
the app ``app.py`` builds; ``api/`` parses, routes and admits each request and asks its
target; ``pull/`` serves upstream content through ``cache/``, fetching it with
``upstream/``; ``hosted/`` keeps pushed images; ``access/`` says who may do what;
``coordination/`` is what replicas share; ``config/`` reads the settings; ``cli/`` is the
command. The modules at the top are the vocabulary they all speak.
"""

__version__ = "0.1.0"
