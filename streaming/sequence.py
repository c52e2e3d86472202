"""PLUS / 3D Slicer image sequence files: ``.igs.mha``, ``.igs.nrrd`` and Slicer ``.seq.nrrd``.

One reader and one writer for the three layouts PLUS and Slicer use for tracked 2-D ultrasound:

* ``.igs.mha`` / ``.mha``: MetaImage with ``ElementDataFile = LOCAL`` (or a detached raw file),
  ``CompressedData = True`` (zlib) or raw. Per-frame fields ``Seq_Frame0000_<Name> = value``.
* ``.igs.nrrd``: NRRD written by PLUS (``kinds: [vector] domain domain [list]``), ``encoding: gz``,
  per-frame fields as key/value pairs ``Seq_Frame0000_<Name>:=value``.
* ``.seq.nrrd``: 3D Slicer's volume sequence (``kinds: domain domain domain list``, a size-1 third
  spatial axis, the frame axis described by ``axis N index values:=`` = timestamps). We also write the
  PLUS per-frame fields into it so transforms and statuses survive a round trip.

Per-frame fields that are understood:

* ``Timestamp`` (seconds, any epoch), ``ImageStatus`` (or PLUS-NRRD's ``Status``): ``OK``/``INVALID``.
* ``<From>To<To>Transform = 16 numbers`` (row-major 4x4) and ``<From>To<To>TransformStatus``.

Anything else is kept as text in :attr:`SequenceFile.frame_fields`, and non-structural header fields
are kept in :attr:`SequenceFile.metadata`, so files round-trip without loss.

Raw (uncompressed) MetaImage data is memory-mapped read-only, so opening a long recording costs no
memory until frames are touched; compressed data is inflated once into a read-only array.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from streaming.frame import Frame

logger = logging.getLogger(__name__)

__all__ = [
    "SequenceFile",
    "SequenceFormatError",
    "read_sequence",
    "sequence_format",
    "write_sequence",
]

OK = "OK"
INVALID = "INVALID"
DEFAULT_FPS = 30.0  # frame interval assumed when a file carries no timestamps

_FRAME_FIELD = re.compile(r"^Seq_Frame(\d+)_(.+)$")
_TRANSFORM_NAME = re.compile(r"^(\w+)To(\w+)Transform$")


class SequenceFormatError(ValueError):
    """A sequence file is malformed or uses a layout we do not read; the message says which and why."""


def _ro(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if a.flags.writeable:
        a = a.view()
        a.setflags(write=False)
    return a


@dataclass(frozen=True, slots=True, eq=False)
class SequenceFile:
    """A tracked 2-D image sequence.

    Attributes:
        frames: ``(N, rows, cols)`` or ``(N, rows, cols, C)`` read-only array (memory-mapped for raw files).
        timestamps: ``(N,)`` float64 seconds as written in the file (PLUS uses its own epoch); when the
            file has none they are synthesised at :data:`DEFAULT_FPS` and :attr:`timestamps_synthetic`
            is True.
        image_status: ``"OK"`` / ``"INVALID"`` per frame.
        transforms: transform name (e.g. ``ProbeToTracker``) -> ``(N, 4, 4)`` float64.
        transform_status: transform name -> per-frame ``"OK"`` / ``"INVALID"``.
        spacing: pixel spacing ``(x, y)`` in mm (column step, row step).
        metadata: non-structural header fields (e.g. ``UltrasoundImageOrientation``), text.
        frame_fields: other per-frame fields, name -> per-frame text ("" where a frame lacks it).
        format: ``"igs.mha"``, ``"igs.nrrd"`` or ``"seq.nrrd"`` (where it was read from; informative).
        timestamps_synthetic: the file had no per-frame timestamps.
    """

    frames: npt.NDArray[Any]
    timestamps: npt.NDArray[np.float64]
    image_status: tuple[str, ...] = ()
    transforms: Mapping[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    transform_status: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    spacing: tuple[float, float] = (1.0, 1.0)
    metadata: Mapping[str, str] = field(default_factory=dict)
    frame_fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    format: str = ""
    timestamps_synthetic: bool = False

    def __post_init__(self) -> None:
        frames = self.frames
        if frames.ndim not in (3, 4):
            raise ValueError(f"frames must be (N, rows, cols[, C]), got shape {frames.shape}")
        n = int(frames.shape[0])
        object.__setattr__(self, "frames", _ro(frames))
        ts = np.asarray(self.timestamps, dtype=np.float64).reshape(-1)
        if ts.shape != (n,):
            raise ValueError(f"timestamps must have {n} entries, got {ts.shape[0]}")
        object.__setattr__(self, "timestamps", _ro(ts))
        status = tuple(self.image_status) or (OK,) * n
        if len(status) != n:
            raise ValueError(f"image_status must have {n} entries, got {len(status)}")
        object.__setattr__(self, "image_status", status)
        tf: dict[str, npt.NDArray[np.float64]] = {}
        for name, mats in self.transforms.items():
            m = np.asarray(mats, dtype=np.float64)
            if m.shape != (n, 4, 4):
                raise ValueError(f"transform {name!r} must be ({n}, 4, 4), got {m.shape}")
            tf[name] = _ro(m)
        object.__setattr__(self, "transforms", MappingProxyType(tf))
        ts_status = {name: tuple(self.transform_status.get(name, ())) or (OK,) * n for name in tf}
        for name, st in ts_status.items():
            if len(st) != n:
                raise ValueError(f"transform_status[{name!r}] must have {n} entries, got {len(st)}")
        object.__setattr__(self, "transform_status", MappingProxyType(ts_status))
        ff = {k: tuple(v) for k, v in self.frame_fields.items()}
        for name, vals in ff.items():
            if len(vals) != n:
                raise ValueError(f"frame_fields[{name!r}] must have {n} entries, got {len(vals)}")
        object.__setattr__(self, "frame_fields", MappingProxyType(ff))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(self, "spacing", (float(self.spacing[0]), float(self.spacing[1])))

    @classmethod
    def from_frames(
        cls,
        frames: npt.NDArray[Any],
        timestamps: Sequence[float] | npt.NDArray[np.float64] | None = None,
        *,
        spacing: tuple[float, float] = (1.0, 1.0),
        transforms: Mapping[str, npt.NDArray[np.float64]] | None = None,
        image_status: Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> SequenceFile:
        """Build a sequence from arrays (timestamps default to :data:`DEFAULT_FPS` from 0)."""
        n = int(frames.shape[0])
        synthetic = timestamps is None
        ts = np.arange(n, dtype=np.float64) / DEFAULT_FPS if timestamps is None else np.asarray(timestamps)
        return cls(
            frames=frames,
            timestamps=ts,
            image_status=tuple(image_status or ()),
            transforms=dict(transforms or {}),
            spacing=spacing,
            metadata=dict(metadata or {}),
            timestamps_synthetic=synthetic,
        )

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def rows(self) -> int:
        return int(self.frames.shape[1])

    @property
    def cols(self) -> int:
        return int(self.frames.shape[2])

    @property
    def components(self) -> int:
        return 1 if self.frames.ndim == 3 else int(self.frames.shape[3])

    @property
    def duration_s(self) -> float:
        return float(self.timestamps[-1] - self.timestamps[0]) if len(self) else 0.0

    def iter_frames(self, device: str = "Image", *, image_to_reference: str | None = None) -> Iterator[Frame]:
        """Yield one :class:`~streaming.frame.Frame` per item (pixels are views, never copies).

        ``image_to_reference`` names a transform (e.g. ``"ImageToReference"``) used as the frame's
        matrix; identity otherwise. The frame's metadata carries ``Timestamp`` (file seconds, as text),
        ``ImageStatus`` and each transform's 16 numbers, so nothing is lost downstream.
        """
        matrices = self.transforms.get(image_to_reference) if image_to_reference else None
        for i in range(len(self)):
            md: dict[str, str] = {
                "Timestamp": repr(float(self.timestamps[i])),
                "ImageStatus": self.image_status[i],
            }
            for name, mats in self.transforms.items():
                md[f"{name}Transform"] = _fmt_numbers(mats[i].reshape(-1))
                md[f"{name}TransformStatus"] = self.transform_status[name][i]
            yield Frame(
                seq=i,
                device=device,
                pixels=self.frames[i],
                spacing_mm=self.spacing,
                image_to_reference=matrices[i] if matrices is not None else np.eye(4),
                metadata=md,
            )


# --------------------------------------------------------------------------------------------- helpers


def _fmt_numbers(values: Sequence[float] | npt.NDArray[np.float64]) -> str:
    """Shortest text that reads back to the identical float64 (``repr``), ints without ``.0``."""
    out = []
    for v in values:
        f = float(v)
        out.append(str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f))
    return " ".join(out)


def _parse_numbers(text: str, where: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise SequenceFormatError(f"{where}: not a list of numbers: {text[:60]!r}") from exc


def sequence_format(path: str | os.PathLike[str]) -> str:
    """``"igs.mha"``, ``"igs.nrrd"`` or ``"seq.nrrd"`` from a file name (``.mha``/``.mhd`` count as mha)."""
    name = Path(path).name.lower()
    if name.endswith(".seq.nrrd"):
        return "seq.nrrd"
    if name.endswith((".nrrd", ".nhdr")):
        return "igs.nrrd"
    if name.endswith((".mha", ".mhd")):
        return "igs.mha"
    raise SequenceFormatError(
        f"{Path(path).name}: unknown sequence file type (expected .mha, .igs.nrrd, .seq.nrrd)"
    )


@dataclass(slots=True)
class _PerFrame:
    """Per-frame fields collected from a header, validated into SequenceFile fields by :meth:`build`."""

    n: int
    where: str
    fields: dict[str, dict[int, str]] = field(default_factory=dict)

    def add(self, key: str, value: str) -> bool:
        m = _FRAME_FIELD.match(key)
        if not m:
            return False
        self.fields.setdefault(m.group(2), {})[int(m.group(1))] = value.strip()
        return True

    def build(self) -> dict[str, Any]:
        n, f = self.n, self.fields
        for name, vals in f.items():
            bad = [i for i in vals if i >= n]
            if bad:
                raise SequenceFormatError(
                    f"{self.where}: Seq_Frame{bad[0]:04d}_{name} but the file holds {n} frames"
                )
        ts_vals = f.pop("Timestamp", {})
        synthetic = len(ts_vals) < n
        if synthetic:
            if ts_vals:
                logger.warning(
                    "%s: %d of %d frames lack a timestamp; using %g fps",
                    self.where,
                    n - len(ts_vals),
                    n,
                    DEFAULT_FPS,
                )
            timestamps = np.arange(n, dtype=np.float64) / DEFAULT_FPS
        else:
            timestamps = np.array([float(ts_vals[i]) for i in range(n)], dtype=np.float64)
        status_vals = f.pop("ImageStatus", None) or f.pop("Status", {})
        image_status = tuple(status_vals.get(i, OK) for i in range(n))
        transforms: dict[str, npt.NDArray[np.float64]] = {}
        transform_status: dict[str, tuple[str, ...]] = {}
        for name in [k for k in f if _TRANSFORM_NAME.match(k)]:
            vals = f.pop(name)
            st = f.pop(f"{name}Status", {})
            mats = np.tile(np.eye(4), (n, 1, 1))
            statuses = []
            for i in range(n):
                if i in vals:
                    nums = _parse_numbers(vals[i], f"{self.where}: Seq_Frame{i:04d}_{name}")
                    if len(nums) != 16:
                        raise SequenceFormatError(
                            f"{self.where}: Seq_Frame{i:04d}_{name} has {len(nums)} numbers, expected 16"
                        )
                    mats[i] = np.asarray(nums).reshape(4, 4)
                    statuses.append(st.get(i, OK))
                else:
                    statuses.append(INVALID)
            key = name[: -len("Transform")]
            transforms[key] = mats
            transform_status[key] = tuple(statuses)
        frame_fields = {name: tuple(vals.get(i, "") for i in range(n)) for name, vals in f.items()}
        return {
            "timestamps": timestamps,
            "timestamps_synthetic": synthetic,
            "image_status": image_status,
            "transforms": transforms,
            "transform_status": transform_status,
            "frame_fields": frame_fields,
        }


def _frame_lines(seq: SequenceFile, sep: str) -> list[str]:
    lines = []
    for i in range(len(seq)):
        p = f"Seq_Frame{i:04d}_"
        for name, mats in seq.transforms.items():
            lines.append(f"{p}{name}Transform{sep}{_fmt_numbers(mats[i].reshape(-1))}")
            lines.append(f"{p}{name}TransformStatus{sep}{seq.transform_status[name][i]}")
        for name, vals in seq.frame_fields.items():
            if vals[i]:
                lines.append(f"{p}{name}{sep}{vals[i]}")
        lines.append(f"{p}Timestamp{sep}{float(seq.timestamps[i])!r}")
        lines.append(f"{p}ImageStatus{sep}{seq.image_status[i]}")
    return lines


def _check_text(value: str, where: str) -> str:
    if "\n" in value or "\r" in value:
        raise SequenceFormatError(f"{where}: header values cannot contain line breaks")
    return value


# ------------------------------------------------------------------------------------------- MetaImage

_MET_TYPES: dict[str, str] = {
    "MET_UCHAR": "u1",
    "MET_CHAR": "i1",
    "MET_USHORT": "u2",
    "MET_SHORT": "i2",
    "MET_UINT": "u4",
    "MET_INT": "i4",
    "MET_ULONG_LONG": "u8",
    "MET_LONG_LONG": "i8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_MET_NAMES: dict[str, str] = {v: k for k, v in _MET_TYPES.items()}
_MHA_STRUCTURAL = {
    "ObjectType", "NDims", "BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData",
    "CompressedDataSize", "DimSize", "ElementNumberOfChannels", "ElementSpacing", "ElementType",
    "ElementDataFile", "Kinds", "Offset", "Position", "Origin", "TransformMatrix", "Rotation", "Orientation",
    "CenterOfRotation", "AnatomicalOrientation", "HeaderSize",
}  # fmt: skip


def _read_mha(path: Path) -> SequenceFile:
    where = path.name
    header: dict[str, str] = {}
    order: list[tuple[str, str]] = []
    with path.open("rb") as f:
        while True:
            raw = f.readline()
            if not raw:
                raise SequenceFormatError(f"{where}: header has no ElementDataFile line")
            line = raw.decode("latin-1").strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise SequenceFormatError(f"{where}: malformed header line {line[:60]!r}")
            key, value = key.strip(), value.strip()
            header[key] = value
            order.append((key, value))
            if key == "ElementDataFile":
                break
        data_offset = f.tell()
    try:
        ndims = int(header["NDims"])
        dims = [int(v) for v in header["DimSize"].split()]
        etype = header["ElementType"]
    except (KeyError, ValueError) as exc:
        raise SequenceFormatError(f"{where}: missing or bad NDims/DimSize/ElementType ({exc})") from exc
    if etype not in _MET_TYPES:
        raise SequenceFormatError(f"{where}: unsupported ElementType {etype}")
    if ndims not in (2, 3) or len(dims) != ndims:
        raise SequenceFormatError(
            f"{where}: only 2-D images and 2-D+t sequences are read (NDims={ndims}, DimSize={dims})"
        )
    cols, rows = dims[0], dims[1]
    n = dims[2] if ndims == 3 else 1
    comps = int(header.get("ElementNumberOfChannels", "1"))
    msb = (
        header.get("BinaryDataByteOrderMSB") or header.get("ElementByteOrderMSB") or "False"
    ).lower() == "true"
    dtype = np.dtype(_MET_TYPES[etype]).newbyteorder(">" if msb else "<")
    shape = (n, rows, cols) + ((comps,) if comps > 1 else ())
    count = int(np.prod(shape))
    nbytes = count * dtype.itemsize
    compressed = header.get("CompressedData", "False").lower() == "true"
    datafile = header["ElementDataFile"]
    if datafile == "LOCAL":
        src, offset = path, data_offset
    else:
        src, offset = path.parent / datafile, 0
        if not src.is_file():
            raise SequenceFormatError(f"{where}: ElementDataFile {datafile} not found")
    if compressed:
        with src.open("rb") as f:
            f.seek(offset)
            csize = int(header.get("CompressedDataSize", "0") or 0)
            blob = f.read(csize if csize > 0 else -1)
        try:
            raw = zlib.decompress(blob)
        except zlib.error as exc:
            raise SequenceFormatError(f"{where}: compressed pixel data is corrupt ({exc})") from exc
        if len(raw) != nbytes:
            raise SequenceFormatError(f"{where}: pixel data has {len(raw)} bytes, expected {nbytes}")
        frames: npt.NDArray[Any] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        size = src.stat().st_size - offset
        if size < nbytes:
            raise SequenceFormatError(f"{where}: pixel data is truncated ({size} of {nbytes} bytes)")
        frames = np.memmap(src, dtype=dtype, mode="r", offset=offset, shape=shape)
    if not dtype.isnative:
        frames = frames.astype(dtype.newbyteorder("="))
    spacing_vals = _parse_numbers(header.get("ElementSpacing", "1 1"), f"{where}: ElementSpacing")
    per = _PerFrame(n, where)
    metadata: dict[str, str] = {}
    for key, value in order:
        if not per.add(key, value) and key not in _MHA_STRUCTURAL:
            metadata[key] = value
    return SequenceFile(
        frames=frames,
        spacing=(spacing_vals[0], spacing_vals[1] if len(spacing_vals) > 1 else spacing_vals[0]),
        metadata=metadata,
        format="igs.mha",
        **per.build(),
    )


def _write_mha(seq: SequenceFile, path: Path, compress: bool) -> None:
    frames = np.ascontiguousarray(seq.frames)
    dt = frames.dtype.newbyteorder("<") if frames.dtype.itemsize > 1 else frames.dtype
    frames = frames.astype(dt, copy=False)
    key = dt.kind + str(dt.itemsize)
    if key not in _MET_NAMES:
        raise SequenceFormatError(f"{path.name}: pixel type {frames.dtype} cannot be written to MetaImage")
    n, rows, cols = frames.shape[:3]
    payload: bytes | memoryview = (
        zlib.compress(frames.data.cast("B"), 1) if compress else frames.data.cast("B")
    )
    lines = [
        "ObjectType = Image",
        "NDims = 3",
        "AnatomicalOrientation = RAI",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        "CenterOfRotation = 0 0 0",
        f"CompressedData = {compress}",
    ]
    if compress:
        lines.append(f"CompressedDataSize = {len(payload)}")
    lines += [
        f"DimSize = {cols} {rows} {n}",
        f"ElementNumberOfChannels = {seq.components}",
        f"ElementSpacing = {_fmt_numbers(seq.spacing)} 1",
        f"ElementType = {_MET_NAMES[key]}",
        "Kinds = domain domain list",
        "Offset = 0 0 0",
        "TransformMatrix = 1 0 0 0 1 0 0 0 1",
    ]
    for k, v in seq.metadata.items():
        if k not in _MHA_STRUCTURAL and not _FRAME_FIELD.match(k):
            lines.append(f"{_check_text(k, path.name)} = {_check_text(v, path.name)}")
    lines += _frame_lines(seq, " = ")
    lines.append("ElementDataFile = LOCAL")
    _atomic_write(path, ("\n".join(lines) + "\n").encode("latin-1"), payload)


# ------------------------------------------------------------------------------------------------ NRRD

_NRRD_TYPES: dict[str, str] = {}
for _names, _code in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (
        (
            "longlong",
            "long long",
            "long long int",
            "signed long long",
            "signed long long int",
            "int64",
            "int64_t",
        ),
        "i8",
    ),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _n in _names:
        _NRRD_TYPES[_n] = _code
_NRRD_NAMES = {"i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32", "u4": "uint32",
               "i8": "int64", "u8": "uint64", "f4": "float", "f8": "double"}  # fmt: skip
_VECTOR_KINDS = {
    "vector", "covariant-vector", "normal", "rgb-color", "rgba-color", "3-color", "4-color",
    "hsv-color", "xyz-color", "complex", "2-vector", "3-vector", "4-vector", "point",
}  # fmt: skip
_LIST_KINDS = {"list", "time", "scalar"}
_SEQ_AXIS = re.compile(r"^axis (\d+) (.+)$")


def _parse_vector(text: str) -> list[float] | None:
    text = text.strip()
    if text == "none":
        return None
    return [float(t) for t in text.strip("()").split(",")]


def _read_nrrd(path: Path) -> SequenceFile:
    where = path.name
    fields: dict[str, str] = {}
    kv: list[tuple[str, str]] = []
    with path.open("rb") as f:
        magic = f.readline().decode("latin-1").strip()
        if not magic.startswith("NRRD000"):
            raise SequenceFormatError(f"{where}: not a NRRD file")
        while True:
            raw = f.readline()
            if not raw:
                break
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            if line.startswith("#"):
                continue
            if ":=" in line:
                k, _, v = line.partition(":=")
                kv.append((k, v))
                continue
            k, sep, v = line.partition(": ")
            if not sep:
                raise SequenceFormatError(f"{where}: malformed header line {line[:60]!r}")
            fields[k.strip().lower()] = v.strip()
        data_offset = f.tell()
    try:
        dim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
        code = _NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError) as exc:
        raise SequenceFormatError(f"{where}: missing or bad dimension/sizes/type ({exc})") from exc
    kinds = fields.get("kinds", " ".join(["domain"] * dim)).lower().split()
    if len(sizes) != dim or len(kinds) != dim:
        raise SequenceFormatError(f"{where}: sizes/kinds do not match dimension {dim}")
    dtype = np.dtype(code).newbyteorder(">" if fields.get("endian", "little") == "big" else "<")
    # Classify axes (fastest first): vector (components), domain (x, y[, z=1]), list (frames).
    comp_axes = [i for i, k in enumerate(kinds) if k in _VECTOR_KINDS]
    list_axes = [i for i, k in enumerate(kinds) if k in _LIST_KINDS]
    dom_axes = [i for i, k in enumerate(kinds) if i not in comp_axes and i not in list_axes]
    extra = [i for i in dom_axes[2:] if sizes[i] != 1]
    if len(comp_axes) > 1 or len(list_axes) > 1 or len(dom_axes) < 2 or extra:
        raise SequenceFormatError(f"{where}: unsupported axes kinds={kinds} sizes={sizes}")
    if comp_axes and comp_axes[0] != 0:
        raise SequenceFormatError(f"{where}: the component axis must be the fastest (kinds={kinds})")
    # Older Slicer writes the list axis first ("list domain domain domain": frame index fastest).
    list_first = bool(list_axes) and list_axes[0] == 0 and dim > 1
    if list_first and comp_axes:
        raise SequenceFormatError(f"{where}: a list axis first with a component axis is not supported")
    if list_axes and not list_first and list_axes[0] != dim - 1:
        raise SequenceFormatError(f"{where}: the frame (list) axis must be the first or last (kinds={kinds})")
    comps = sizes[comp_axes[0]] if comp_axes else 1
    cols, rows = sizes[dom_axes[0]], sizes[dom_axes[1]]
    n = sizes[list_axes[0]] if list_axes else 1
    shape = (n, rows, cols) + ((comps,) if comps > 1 else ())
    nbytes = int(np.prod(shape)) * dtype.itemsize
    file_shape = (rows, cols, n) if list_first else shape
    encoding = fields.get("encoding", "raw").lower()
    src, offset = path, data_offset
    if "data file" in fields or "datafile" in fields:
        src, offset = path.parent / (fields.get("data file") or fields["datafile"]), 0
    frames: npt.NDArray[Any]
    if encoding == "raw":
        if src.stat().st_size - offset < nbytes:
            raise SequenceFormatError(f"{where}: pixel data is truncated")
        frames = np.memmap(src, dtype=dtype, mode="r", offset=offset, shape=file_shape)
    elif encoding in ("gz", "gzip"):
        with src.open("rb") as f:
            f.seek(offset)
            try:
                raw = gzip.decompress(f.read())
            except (OSError, EOFError, zlib.error) as exc:
                raise SequenceFormatError(f"{where}: gzip pixel data is corrupt ({exc})") from exc
        if len(raw) != nbytes:
            raise SequenceFormatError(f"{where}: pixel data has {len(raw)} bytes, expected {nbytes}")
        frames = np.frombuffer(raw, dtype=dtype).reshape(file_shape)
    else:
        raise SequenceFormatError(f"{where}: unsupported NRRD encoding {encoding!r}")
    if list_first:
        frames = np.ascontiguousarray(np.moveaxis(frames, 2, 0))  # one copy: frames become contiguous
    if not dtype.isnative:
        frames = frames.astype(dtype.newbyteorder("="))
    spacing = [1.0, 1.0]
    if "space directions" in fields:
        vecs = re.findall(r"\([^)]*\)|none", fields["space directions"])
        non_none = [v for v in vecs if v != "none"]
        for j in range(2):
            if j < len(non_none):
                vec = _parse_vector(non_none[j]) or [1.0]
                spacing[j] = float(math.sqrt(sum(c * c for c in vec)))
    elif "spacings" in fields:
        sp = [float(s) for s in fields["spacings"].split() if s.lower() != "nan"]
        spacing = sp[:2] if len(sp) >= 2 else spacing
    per = _PerFrame(n, where)
    metadata: dict[str, str] = {}
    list_values: list[float] | None = None
    for key, value in kv:
        if per.add(key, value):
            continue
        m = _SEQ_AXIS.match(key)
        # Slicer numbers the list axis without counting the component axis ("axis 3" for RGB too).
        if m and list_axes and int(m.group(1)) in (list_axes[0], list_axes[0] - len(comp_axes)):
            if m.group(2) == "index values":
                try:
                    list_values = [float(v) for v in value.split()]
                except ValueError:
                    list_values = (
                        None  # Slicer allows text index values; timestamps then come from Seq_ fields
                    )
            continue
        metadata[key] = value
    built = per.build()
    if built["timestamps_synthetic"] and list_values is not None and len(list_values) == n:
        built["timestamps"] = np.asarray(list_values, dtype=np.float64)
        built["timestamps_synthetic"] = False
    fmt = "seq.nrrd" if path.name.lower().endswith(".seq.nrrd") else "igs.nrrd"
    return SequenceFile(
        frames=frames, spacing=(spacing[0], spacing[1]), metadata=metadata, format=fmt, **built
    )


def _write_nrrd(seq: SequenceFile, path: Path, compress: bool, slicer: bool) -> None:
    frames = np.ascontiguousarray(seq.frames)
    dt = frames.dtype.newbyteorder("<") if frames.dtype.itemsize > 1 else frames.dtype
    frames = frames.astype(dt, copy=False)
    code = dt.kind + str(dt.itemsize)
    if code not in _NRRD_NAMES:
        raise SequenceFormatError(f"{path.name}: pixel type {frames.dtype} cannot be written to NRRD")
    n, rows, cols = frames.shape[:3]
    c = seq.components
    sx, sy = (_fmt_numbers([s]) for s in seq.spacing)
    sizes: list[int] = ([c] if c > 1 else []) + [cols, rows]
    kinds: list[str] = (["vector"] if c > 1 else []) + ["domain", "domain"]
    dirs: list[str] = (["none"] if c > 1 else []) + (
        [f"({sx},0,0)", f"(0,{sy},0)"] if slicer else [f"({sx},0)", f"(0,{sy})"]
    )
    if slicer:
        sizes.append(1)
        kinds.append("domain")
        dirs.append("(0,0,1)")
    sizes.append(n)
    kinds.append("list")
    dirs.append("none")
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_NAMES[code]}",
        f"dimension: {len(sizes)}",
    ]
    lines.append("space: left-posterior-superior" if slicer else "space dimension: 2")
    lines += [
        f"sizes: {' '.join(map(str, sizes))}",
        f"space directions: {' '.join(dirs)}",
        f"kinds: {' '.join(kinds)}",
        "endian: little",
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: (0,0,0)" if slicer else "space origin: (0,0)",
    ]
    if slicer:
        # Current Slicer layout: list axis last, named "axis 3" whether or not there is a component axis.
        blanks = ['""'] * (len(sizes) - 1)
        lines += [
            "labels: " + " ".join([*blanks, '"time"']),
            "units: " + " ".join([*blanks, '"s"']),
            "axis 3 index type:=numeric",
            f"axis 3 index values:={' '.join(repr(float(t)) for t in seq.timestamps)}",
            f"DataNodeClassName:={'vtkMRMLVectorVolumeNode' if c > 1 else 'vtkMRMLScalarVolumeNode'}",
        ]
    for k, v in seq.metadata.items():
        if _SEQ_AXIS.match(k) or _FRAME_FIELD.match(k) or (slicer and k == "DataNodeClassName"):
            continue
        lines.append(f"{_check_text(k, path.name)}:={_check_text(v, path.name)}")
    lines += _frame_lines(seq, ":=")
    payload: bytes | memoryview = (
        gzip.compress(frames.data.cast("B"), compresslevel=1, mtime=0) if compress else frames.data.cast("B")
    )
    _atomic_write(path, ("\n".join(lines) + "\n\n").encode("latin-1"), payload)


# ---------------------------------------------------------------------------------------------- public


def _atomic_write(path: Path, header: bytes, payload: bytes | memoryview) -> None:
    """Write to ``path.tmp`` then rename, so a crash never leaves a half-written file under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_sequence(path: str | os.PathLike[str]) -> SequenceFile:
    """Read a ``.igs.mha``/``.mha``/``.mhd``, ``.igs.nrrd``/``.nrrd`` or Slicer ``.seq.nrrd`` file.

    Raises:
        SequenceFormatError: malformed or unsupported file.
        OSError: the file cannot be read.
    """
    p = Path(path)
    fmt = sequence_format(p)
    seq = _read_mha(p) if fmt == "igs.mha" else _read_nrrd(p)
    logger.debug("read %s: %d frames %dx%dx%d", p.name, len(seq), seq.cols, seq.rows, seq.components)
    return seq


def write_sequence(seq: SequenceFile, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """Write ``seq`` in the format named by the file suffix (``.igs.mha``, ``.igs.nrrd``, ``.seq.nrrd``).

    ``compress``: zlib for MetaImage (``CompressedData = True``), gzip for NRRD; raw otherwise.
    The file is written atomically (temporary file + rename). Returns the path.
    """
    p = Path(path)
    fmt = sequence_format(p)
    if fmt == "igs.mha":
        _write_mha(seq, p, compress)
    else:
        _write_nrrd(seq, p, compress, slicer=fmt == "seq.nrrd")
    logger.info("wrote %s: %d frames (%s%s)", p.name, len(seq), fmt, ", compressed" if compress else "")
    return p
