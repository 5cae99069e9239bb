"""An embedded, Toxiproxy 2.x compatible server (stdlib asyncio, one daemon thread).

The unmodified ``toxiproxy-python`` client works against it. See ``server.py`` for the
entry point, ``api.py`` for the HTTP API, ``proxy.py``/``link.py`` for the data path and
``toxics.py`` for the toxics.
"""

from .server import ConfigError, EmbeddedToxiproxy

__all__ = ["EmbeddedToxiproxy", "ConfigError"]
