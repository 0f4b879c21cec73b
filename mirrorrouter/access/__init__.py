"""Who is asking and what they may do: client logins (``clientauth.py``, with bcrypt off the
event loop in ``passwords.py``), the one access decision (``policy.py``) and the audit log
of pulls (``audit.py``). It knows the configuration and the routing, nothing of caches or
upstreams.
"""
