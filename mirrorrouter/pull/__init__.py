"""Pull-through: serving pulls of upstream content from the cache, fetching what it lacks.

``pullthrough.py`` is the policy (digests cache-first, tags with a TTL and HEAD
revalidation, stale when upstream fails); ``site.py`` one upstream at run time with its
memory indexes; ``singleflight.py`` the fill every reader of a blob follows; ``fill.py``
the download behind a fill, its one owner; ``peers.py`` how replicas follow each other's
downloads. It asks ``upstream`` and stores in ``cache``; it knows nothing of HTTP requests.
"""
