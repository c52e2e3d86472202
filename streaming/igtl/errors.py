"""Exceptions of the OpenIGTLink transport.

Everything the decoder can raise on bad input is a :class:`ProtocolError` (or a subclass); nothing else
escapes :func:`streaming.igtl.codec.decode_message` for any byte string (checked by property tests).
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Bytes that are not a valid OpenIGTLink message (the message says what is wrong)."""


class FramingError(ProtocolError):
    """The stream cannot be trusted any more (bad header, absurd size, wrong CRC, stalled peer).

    A connection that raises this is closed and (for the client) reconnected.
    """


class CrcError(FramingError):
    """The body's CRC-64 does not match the header."""


class MessageTooLargeError(FramingError):
    """``body_size`` exceeds the configured ``max_body_bytes`` (nothing is allocated)."""


class StalledPeerError(FramingError):
    """The peer stopped sending in the middle of a message for longer than the stall timeout."""


class UnsupportedContentError(ProtocolError):
    """A well-formed message we deliberately do not handle (3-D volume, sub-volume...); it is skipped."""
