"""The gateway's HTTP API: requests parsed once, routed, admitted and answered.

``endpoints.py`` is the door (parse, route, identify, admit, log); groups ask their
members through typed calls (``groups.py``); ``responses.py`` holds the streaming blob
response; ``monitor.py`` and ``statuspage.py`` are what the gateway says about itself.
"""
