"""Hosted repository sets: images pushed to the gateway and served from it.

``store.py`` is one set on the cache storage layer (``HostedStore``), with ``blobs.py``
(blobs written verified, and copied in), ``memory.py`` (manifest reads remembered under the
set's generation), ``referrers.py`` (the referrers listing) and ``gc.py`` (its garbage
collection); ``sets.py`` every set of the process with its chores
(``housekeeping.py``, ``schedule.py``); ``api.py`` the push API over HTTP, with
``uploads.py`` (upload sessions) and ``limits.py`` (what clients may store);
``shadowing.py`` the guard against pushes that would hide an upstream's names from a
group's clients (it asks the pull-through, the one thing of ``pull`` hosted sets use).
"""
