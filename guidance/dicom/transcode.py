"""Lossless compressed copies of our DICOM files, for peers that accept only a compressed transfer syntax.

The spool keeps every object in Explicit VR Little Endian. When a peer accepts an object's SOP class only
with a lossless compressed syntax, :func:`compress_file` writes a compressed copy *streaming*: the header is
re-encoded by pydicom (same SOP Instance UID, same attributes), then each frame is read from the source
file, encoded on its own and appended as one fragment of encapsulated Pixel Data (PS3.5 A.4), with a Basic
Offset Table. Memory stays at one frame whatever the object's size; nothing is ever lossy.

Syntaxes (PS3.5 A.4.2 / 8.2.3-8.2.4 and Annex G):

- RLE Lossless (1.2.840.10008.1.2.5): always available (pydicom's numpy encoder; the ``pylibjpeg-rle``
  plugin is used when installed and is ~20x faster).
- JPEG-LS Lossless (1.2.840.10008.1.2.4.80): when the ``pyjpegls`` plugin is installed.

Binary Segmentation (1 bit per pixel) is not compressed: pydicom cannot encode 1-bit frames and bit-packed
masks are small already.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels.encoders.base import JPEGLSLosslessEncoder, RLELosslessEncoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

logger = logging.getLogger(__name__)

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

TRANSFER_SYNTAX_NAMES: dict[str, str] = {
    str(ExplicitVRLittleEndian): "Explicit VR Little Endian",
    str(ImplicitVRLittleEndian): "Implicit VR Little Endian",
    RLE_LOSSLESS: "RLE Lossless",
    JPEG_LS_LOSSLESS: "JPEG-LS Lossless",
}

_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
_PIXEL_DATA = 0x7FE00010


def lossless_syntaxes(sop_class_uid: str) -> list[str]:
    """The lossless compressed syntaxes we can produce for objects of ``sop_class_uid``, preferred first."""
    if sop_class_uid == _SEGMENTATION:
        return []
    out = [RLE_LOSSLESS]
    if JPEGLSLosslessEncoder.is_available:
        out.append(JPEG_LS_LOSSLESS)
    return out


def proposed_syntaxes(sop_class_uid: str) -> list[str]:
    """What C-STORE proposes for a SOP class, one presentation context each: Explicit VR Little Endian
    (the spooled files' own), the lossless compressed syntaxes, then Implicit VR Little Endian (the
    default every peer must accept)."""
    return [str(ExplicitVRLittleEndian), *lossless_syntaxes(sop_class_uid), str(ImplicitVRLittleEndian)]


def _encoder(transfer_syntax: str) -> Callable[..., bytes]:
    if transfer_syntax == RLE_LOSSLESS:
        return RLELosslessEncoder.encode
    if transfer_syntax == JPEG_LS_LOSSLESS:
        if not JPEGLSLosslessEncoder.is_available:
            raise ValueError("JPEG-LS Lossless needs the pyjpegls package")
        return JPEGLSLosslessEncoder.encode
    raise ValueError(f"not a lossless compressed transfer syntax we write: {transfer_syntax}")


def _pixel_data_offset(fh: Any, header: Dataset) -> tuple[int, int]:
    """(offset of the Pixel Data value, its length) in an uncompressed file positioned after ``header``."""
    pos = fh.tell()
    raw = fh.read(12)
    group, elem = struct.unpack("<HH", raw[:4])
    if (group << 16 | elem) != _PIXEL_DATA:
        raise ValueError("the file has elements after the pixel data or no pixel data")
    vr = raw[4:6]
    if vr in (b"OB", b"OW"):
        (length,) = struct.unpack("<I", raw[8:12])
        return pos + 12, int(length)
    # Implicit VR: tag + 4-byte length
    (length,) = struct.unpack("<I", raw[4:8])
    return pos + 8, int(length)


def transcode_file(src: Path, dst: Path, transfer_syntax: str) -> int:
    """Write a copy of the uncompressed DICOM file ``src`` as ``dst`` (atomically) in ``transfer_syntax``:
    Implicit VR Little Endian, or a lossless compressed syntax (:func:`lossless_syntaxes`).

    Same data set, same UIDs; only the transfer syntax and the Pixel Data encoding change. Streaming:
    memory stays at one frame whatever the object's size. Returns the size of ``dst``.

    Raises:
        ValueError: the object cannot be written in that syntax (1-bit pixels compressed, source already
            compressed, unknown syntax).
    """
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        with open(src, "rb") as fh:
            header = dcmread(fh, stop_before_pixels=True)
            if str(header.file_meta.TransferSyntaxUID) not in UNCOMPRESSED:
                raise ValueError("the source is not in an uncompressed transfer syntax")
            offset, length = _pixel_data_offset(fh, header)
            with open(tmp, "wb") as out:
                if transfer_syntax == str(ImplicitVRLittleEndian):
                    header.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
                    dcmwrite(out, header, implicit_vr=True, little_endian=True, enforce_file_format=True)
                    out.write(struct.pack("<HHI", 0x7FE0, 0x0010, length))
                    fh.seek(offset)
                    _copy(fh, out, length)
                    frames = int(header.get("NumberOfFrames", 1) or 1)
                else:
                    frames = _write_encapsulated(fh, out, header, offset, length, transfer_syntax)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info(
        "Transcoded copy (%s): %d frames, %d -> %d bytes",
        TRANSFER_SYNTAX_NAMES.get(transfer_syntax, transfer_syntax),
        frames,
        length,
        size,
    )
    return size


def _copy(fh: Any, out: Any, length: int, chunk: int = 4 << 20) -> None:
    left = length
    while left > 0:
        data = fh.read(min(chunk, left))
        if not data:
            raise ValueError("the pixel data is shorter than its length says")
        out.write(data)
        left -= len(data)


def _write_encapsulated(  # noqa: PLR0917 - one private call site
    fh: Any, out: Any, header: Dataset, offset: int, length: int, transfer_syntax: str
) -> int:
    """Header + encapsulated Pixel Data (Basic Offset Table, one fragment per frame). Returns frames."""
    encode = _encoder(transfer_syntax)
    rows, cols = int(header.Rows), int(header.Columns)
    spp, bits = int(header.SamplesPerPixel), int(header.BitsAllocated)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if bits not in (8, 16):
        raise ValueError(f"{bits}-bit pixels are not compressed")
    if spp == 3 and int(header.get("PlanarConfiguration", 0)) != 0:
        raise ValueError("only colour-by-pixel (Planar Configuration 0) RGB is compressed")
    frame_bytes = rows * cols * spp * (bits // 8)
    if length < frames * frame_bytes:
        raise ValueError("the pixel data is shorter than Rows x Columns x Number of Frames")
    dtype = np.dtype("<u1" if bits == 8 else "<u2")
    shape = (rows, cols, spp) if spp > 1 else (rows, cols)
    kwargs: dict[str, Any] = {
        "rows": rows,
        "columns": cols,
        "samples_per_pixel": spp,
        "bits_allocated": bits,
        "bits_stored": int(header.BitsStored),
        "pixel_representation": int(header.PixelRepresentation),
        "photometric_interpretation": str(header.PhotometricInterpretation),
        "number_of_frames": 1,
        "planar_configuration": 0,
    }
    header.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    dcmwrite(out, header, enforce_file_format=True)
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    bot_pos = out.tell()
    out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 4 * frames) + bytes(4 * frames))
    first = out.tell()
    offsets: list[int] = []
    fh.seek(offset)
    for _ in range(frames):
        frame = np.frombuffer(fh.read(frame_bytes), dtype).reshape(shape)
        data = encode(frame, **kwargs)
        if len(data) & 1:
            data += b"\0"
        offsets.append(out.tell() - first)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(data)))
        out.write(data)
    out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    end = out.tell()
    out.seek(bot_pos + 8)  # instances stay < 2 GB, so every offset fits in 32 bits
    out.write(struct.pack(f"<{frames}I", *offsets))
    out.seek(end)
    return frames
