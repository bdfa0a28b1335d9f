"""rtcore: the hot parts of the realtime gateway.

Predicate compilation, the subscription index, event normalization and frame encoding.
Every compiled module has a pure-Python reference beside it; rtcore never imports rtserver.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
