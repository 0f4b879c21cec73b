"""The gateway's HTTP API: requests parsed once, routed, admitted and answered.

``endpoints.py`` is the door (parse, route, identify, admit, dispatch; ``calls.py`` the
parse and the admitted ``Call``, ``login.py`` who is asking); ``targets.py`` asks an
upstream or a hosted set in typed values and ``groups.py`` asks a group's members the same
way; ``rendering.py`` writes the answers (``responses.py``: the blob response) and
``failures.py`` the errors; ``monitor.py`` and ``statuspage.py`` are what the gateway says
about itself; ``peer.py`` serves downloads to other replicas.
"""
