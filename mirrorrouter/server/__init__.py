"""The HTTP server the gateway runs in (``httpserver.py``): uvicorn's httptools protocol with
connection deadlines, a head-size cap, the connection limit and OCI answers of its own;
the HTTPS listener (``tls.py``) and ``sendfile`` of committed blobs (``zerocopy.py``).
It knows nothing of the app's routes: it serves any ASGI app.
"""
