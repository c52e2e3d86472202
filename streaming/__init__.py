"""Transport layer: OpenIGTLink codec/client/server, recordings, replay, sequence files.

Knows nothing of ``engines``, ``guidance`` or ``ui`` (checked by import-linter).
"""

from streaming.frame import Frame

__all__ = ["Frame"]
