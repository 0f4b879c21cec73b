"""Hosted repository sets: images pushed to the gateway and served from it.

``store.py`` is one set on the cache storage layer (``HostedStore``); ``api.py`` the push
API over HTTP; ``uploads.py`` the upload sessions; ``limits.py`` what clients may store;
``shadowing.py`` the guard against pushes that hide an upstream's names from a group's
clients (it asks the pull-through); ``housekeeping.py`` the background chores.
"""
