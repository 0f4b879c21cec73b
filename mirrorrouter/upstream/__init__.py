"""Talking to upstream registries: one ``UpstreamClient`` per upstream (``client.py``).

Everything below the client serves it: the registry token flow (``auth.py``), one request
to a mirror with its redirects (``sending.py``), bounded reads of what comes back
(``bodies.py``), what an answer means (``answers.py``), the retry policy (``retry.py``),
the circuit breaker (``breaker.py``), hedged requests (``hedging.py``), the fast aiohttp
transport (``transport.py``) and the proxy rules it follows (``proxies.py``). Nothing here
knows of caches, pulls or the gateway's own HTTP API.
"""
