"""The HTTP server the gateway runs in: uvicorn's httptools protocol with connection
deadlines, a head-size cap, the connection limit (``protocol.py``) and OCI answers of its
own (``answers.py``); starting it in one process or many (``running.py``); the HTTPS
listener (``tls.py``) and ``sendfile`` of committed blobs (``zerocopy.py``).
It knows nothing of the app's routes: it serves any ASGI app.
"""
