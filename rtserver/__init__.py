"""rtserver: the asyncio gateway (WebSocket server, auth, sources, audit, configuration, CLI)."""

from rtcore import __version__

__all__ = ["__version__"]
