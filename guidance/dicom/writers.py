"""DICOM object writers: US cine, multi-frame Secondary Capture, binary Segmentation, burned-in AI overlay.

Every mandatory attribute of each IOD is filled here, with the PS3.3 module it belongs to in a comment.
Objects are written *streaming*: the header is encoded with pydicom, then (7FE0,0010) Pixel Data is
appended in blocks straight from the source frames, so a 2 GB instance never needs 2 GB of memory. Files
are written atomically (temporary name, fsync, rename) so a crash never leaves a half object under its
final name.

Long recordings are split into several instances of the same series so that no instance exceeds
``max_instance_bytes`` (default just under 2 GB); each part holds as many frames as fit, never one
instance per frame. A Segmentation is written per source part and references that part's frames.

Transfer syntax: Explicit VR Little Endian (uncompressed) for every object written here; lossless
compressed copies for the network are made by :mod:`guidance.dicom.transcode`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from engines.base import CLASS_NAMES, INSTRUMENT, TARGET
from guidance import __version__
from guidance.dicom.study import PatientStudy, new_uid
from streaming.frame import Frame

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- SOP classes
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
SC_MULTIFRAME_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC Image Storage
SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage
SC_MULTIFRAME_RGB = "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color SC Image Storage
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage

SOP_CLASS_NAMES: dict[str, str] = {
    US_MULTIFRAME: "Ultrasound Multi-frame Image Storage",
    SC_MULTIFRAME_BYTE: "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    SC_MULTIFRAME_WORD: "Multi-frame Grayscale Word Secondary Capture Image Storage",
    SC_MULTIFRAME_RGB: "Multi-frame True Color Secondary Capture Image Storage",
    SEGMENTATION: "Segmentation Storage",
}

#: Keep each instance under 2 GiB (a 32-bit Pixel Data length and many PACS limits) with room for the header.
DEFAULT_MAX_INSTANCE_BYTES = 2_000_000_000

_FRAME_TIME = Tag(0x0018, 0x1063)
_FRAME_TIME_VECTOR = Tag(0x0018, 0x1065)
_BLOCK_FRAMES = 64  # frames per pixel write (multiple of 8 so packed SEG bits stay byte-aligned)

# Modality the caller names -> (General Series Modality, human description). "XF" is our shorthand for a
# frame-grabbed fluoroscopy monitor; DICOM's code for fluoroscopy is RF.
_SC_MODALITIES = {"XF": "RF", "RF": "RF", "XA": "XA", "OT": "OT", "US": "US"}


Images = npt.NDArray[np.generic] | Sequence[Frame]


@dataclass(frozen=True, slots=True)
class Equipment:
    """Who made the object (General / Enhanced General Equipment, SC Equipment)."""

    manufacturer: str = "Guidance team"
    model_name: str = "guidance"
    device_serial_number: str = "0"
    software_version: str = __version__
    institution_name: str = ""
    station_name: str = ""


@dataclass(frozen=True, slots=True)
class AlgorithmInfo:
    """The segmentation algorithm, written into each segment (Segment Description macro)."""

    name: str = "guidance"
    version: str = __version__
    family: tuple[str, str, str] = ("123110", "DCM", "Artificial Intelligence")  # CID 7162


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """A series to write into: UID, number and description. A new UID is made when none is given."""

    number: int
    description: str
    uid: str = field(default_factory=new_uid)


@dataclass(frozen=True, slots=True)
class WrittenObject:
    """One DICOM file we wrote (identity only, no patient data)."""

    path: Path
    kind: str  # "us-cine" | "sc" | "seg" | "overlay"
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frames: int  # frames in this instance
    first_frame: int  # index of its first source frame in the recording (0-based)
    size_bytes: int


# Segment definitions: label value -> (label, category code, type code). Codes from SNOMED CT (CID 7150/7151).
_SEGMENT_CODES: dict[int, tuple[str, tuple[str, str, str], tuple[str, str, str]]] = {
    INSTRUMENT: (
        "Needle or catheter",
        ("260787004", "SCT", "Physical object"),
        ("79068005", "SCT", "Needle"),
    ),
    TARGET: (
        "Target",
        ("49755003", "SCT", "Morphologically Abnormal Structure"),
        ("52988006", "SCT", "Lesion"),
    ),
}


# ============================================================================================ inputs
@dataclass(frozen=True, slots=True, eq=False)
class _Stack:
    """Normalised access to frames: count, geometry, dtype, and contiguous blocks."""

    source: Images

    def __len__(self) -> int:
        return len(self.source)

    def first(self) -> npt.NDArray[np.generic]:
        if isinstance(self.source, np.ndarray):
            first: npt.NDArray[np.generic] = self.source[0]
            return first
        return self.source[0].pixels

    def block(self, i0: int, i1: int) -> npt.NDArray[np.generic]:
        if isinstance(self.source, np.ndarray):
            blk = self.source[i0:i1]
        else:
            blk = np.stack([_gray(f.pixels) for f in self.source[i0:i1]])
        return np.ascontiguousarray(blk)


def _require_resolved(study: PatientStudy) -> None:
    if not study.study_instance_uid or not study.study_date:
        raise ValueError(
            "resolve the study once (PatientStudy.resolved()) and pass the result to every writer"
        )


def _gray(p: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    if p.ndim == 3 and p.shape[2] == 1:
        return p[:, :, 0]
    return p


def _stack(images: Images) -> tuple[_Stack, int, int, np.dtype[np.generic]]:
    st = _Stack(images)
    if len(st) == 0:
        raise ValueError("no frames to write")
    f0 = _gray(st.first())
    if isinstance(images, np.ndarray) and images.ndim != 3:
        raise ValueError(f"expected an (N, rows, cols) array, got shape {images.shape}")
    if f0.ndim != 2:
        raise ValueError(f"only single-component (grayscale) frames can be archived, got {f0.shape}")
    if f0.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"frames must be uint8 or uint16, got {f0.dtype}")
    return st, int(f0.shape[0]), int(f0.shape[1]), f0.dtype


def frame_times_s(
    images: Images, times_s: Sequence[float] | npt.NDArray[np.floating] | None, fps: float | None
) -> npt.NDArray[np.float64]:
    """Per-frame times in seconds from explicit ``times_s``, the Frames' receive clocks, or ``fps``."""
    n = len(images)
    if times_s is not None:
        t = np.asarray(times_s, dtype=np.float64)
        if t.shape != (n,):
            raise ValueError(f"times_s has {t.size} values for {n} frames")
    elif not isinstance(images, np.ndarray) and images[0].receive_ns:
        t = np.array([f.receive_ns for f in images], dtype=np.float64) / 1e9
    elif fps:
        t = np.arange(n, dtype=np.float64) / float(fps)
    else:
        raise ValueError("frame times are unknown: pass times_s or fps")
    if n > 1 and np.any(np.diff(t) <= 0):
        raise ValueError("frame times must increase strictly")
    return t


def _spacing(images: Images, spacing_mm: tuple[float, float] | None) -> tuple[float, float] | None:
    """(x, y) = (column step, row step) in mm, or None when unknown."""
    if spacing_mm is not None:
        return (float(spacing_mm[0]), float(spacing_mm[1]))
    if not isinstance(images, np.ndarray):
        return images[0].spacing_mm
    return None


def _start_datetime(images: Images, start: _dt.datetime | None) -> _dt.datetime:
    if start is not None:
        return start
    if not isinstance(images, np.ndarray) and images[0].receive_wall_ns:
        return _dt.datetime.fromtimestamp(images[0].receive_wall_ns / 1e9)
    return _dt.datetime.now()


# ============================================================================================ helpers
def _ds_str(x: float) -> str:
    """A DS value of at most 16 characters."""
    s = f"{x:.6g}"
    return s if len(s) <= 16 else f"{x:.9e}"[:16]


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _da(t: _dt.datetime) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: _dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")


def _base_dataset(
    sop_class: str,
    sop_instance: str,
    *,
    study: PatientStudy,
    series: SeriesInfo,
    modality: str,
    equipment: Equipment,
    instance_number: int,
    content_time: _dt.datetime,
) -> Dataset:
    """Modules shared by every IOD we write: Patient, General Study, General Series, General Equipment,
    General Image (common part) and SOP Common."""
    ds = Dataset()
    now = _dt.datetime.now()
    # SOP Common (PS3.3 C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: typed names may use any script
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = _da(now)
    ds.InstanceCreationTime = _tm(now)
    # Patient (C.7.1.1): type 2 attributes present even when empty
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    if study.study_description:
        ds.StudyDescription = study.study_description
    if study.requested_procedure_id or study.scheduled_step_id:
        # Request Attributes (C.4.10 macro, via General Series Request Attributes Sequence)
        req = Dataset()
        req.RequestedProcedureID = study.requested_procedure_id
        req.ScheduledProcedureStepID = study.scheduled_step_id
        if study.accession_number:
            req.AccessionNumber = study.accession_number
        ds.RequestAttributesSequence = DicomSequence([req])
    # General Series (C.7.3.1)
    ds.Modality = modality
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    if modality != "SEG":  # type 2C; the Segmentation Series module has no Laterality
        ds.Laterality = ""  # we cannot know whether the imaged part is paired: present and empty
    ds.SeriesDate = _da(content_time)
    ds.SeriesTime = _tm(content_time)
    # General Equipment (C.7.5.1)
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model_name
    ds.DeviceSerialNumber = equipment.device_serial_number
    ds.SoftwareVersions = equipment.software_version
    if equipment.institution_name:
        ds.InstitutionName = equipment.institution_name
    if equipment.station_name:
        ds.StationName = equipment.station_name
    # General Image (C.7.6.1)
    ds.InstanceNumber = instance_number
    ds.ContentDate = _da(content_time)
    ds.ContentTime = _tm(content_time)
    return ds


def _add_cine(ds: Dataset, times_s: npt.NDArray[np.float64]) -> None:
    """Cine (C.7.6.5) + Multi-frame (C.7.6.6) timing: Frame Time when regular, else Frame Time Vector."""
    n = len(times_s)
    ds.NumberOfFrames = n
    if n == 1:
        ds.FrameTime = "0"
        ds.FrameIncrementPointer = _FRAME_TIME
        return
    dt_ms = np.diff(times_s) * 1e3
    median = float(np.median(dt_ms))
    if float(np.max(np.abs(dt_ms - median))) <= 0.5:
        ds.FrameTime = _ds_str(median)
        ds.FrameIncrementPointer = _FRAME_TIME
    else:
        # Frame Time Vector: first value 0, then the interval before each frame (ms)
        ds.FrameTimeVector = ["0", *(_ds_str(float(x)) for x in dt_ms)]
        ds.FrameIncrementPointer = _FRAME_TIME_VECTOR
    rate = 1e3 / median if median > 0 else 0.0
    ds.RecommendedDisplayFrameRate = max(1, round(rate))
    ds.CineRate = max(1, round(rate))
    ds.ActualFrameDuration = max(1, round(median))
    ds.StartTrim = 1
    ds.StopTrim = n


def _image_pixel(ds: Dataset, rows: int, cols: int, dtype: np.dtype[np.generic], photometric: str) -> None:
    """Image Pixel (C.7.6.3) description (the Pixel Data itself is streamed after the header)."""
    bits = 8 if dtype == np.uint8 else 16
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0


def _parts(n: int, frame_bytes: int, max_instance_bytes: int) -> list[tuple[int, int]]:
    """Split ``n`` frames into [i0, i1) parts of at most ``max_instance_bytes`` of pixel data each."""
    per = max(1, (max_instance_bytes - 1_000_000) // max(frame_bytes, 1))
    return [(i, min(n, i + per)) for i in range(0, n, per)]


def _write_file(
    path: Path,
    ds: Dataset,
    vr: str,
    pixel_blocks: Iterator[memoryview | bytes],
    length: int,
    *,
    per_frame_groups: bytes = b"",
) -> int:
    """Write ``ds`` then a (7FE0,0010) element of ``length`` bytes from ``pixel_blocks``, atomically.

    ``per_frame_groups``: an encoded (5200,9230) Per-frame Functional Groups Sequence element written
    between the header and the pixels (``ds`` must then hold no element after (5200,9230)).
    Returns the file size. The header goes through pydicom; the pixels never exist as one bytes object.
    """
    if per_frame_groups and any(int(e.tag) >= _PER_FRAME_FG for e in ds):
        raise ValueError("internal error: the header holds elements after the per-frame functional groups")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"GUIDANCE_{__version__}"[:16]
    ds.file_meta = meta
    padded = length + (length & 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as fh:
            dcmwrite(fh, ds, enforce_file_format=True)
            fh.write(per_frame_groups)
            fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr.encode("ascii"), 0, padded))
            written = 0
            for blk in pixel_blocks:
                fh.write(blk)
                written += len(blk)
            if written != length:
                raise RuntimeError(f"internal error: wrote {written} pixel bytes, expected {length}")
            if padded != length:
                fh.write(b"\0")
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return size


# ------------------------------------------------ pre-encoded elements (Explicit VR Little Endian, PS3.5 7.1.2)
_PER_FRAME_FG = 0x52009230  # (5200,9230) Per-frame Functional Groups Sequence
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def _el(tag: int, vr: str, value: bytes) -> bytes:
    """One data element with a defined length (value padded to even length: NUL for UI/OB, else space)."""
    if len(value) & 1:
        value += b"\0" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode("ascii"))
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _sq(tag: int, items: Sequence[bytes]) -> bytes:
    """A sequence of defined length whose items (encoded contents) have defined lengths (PS3.5 7.5)."""
    body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(i)) + i for i in items)
    return _el(tag, "SQ", body)


def _encode_item(item: Dataset) -> bytes:
    """The encoded contents of one sequence item (for the constant parts, built once with pydicom)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, item)
    return fp.getvalue()


def _seg_per_frame_groups(
    src: WrittenObject, n_src: int, n_seg: int, purpose: Dataset, derivation_code: Dataset
) -> bytes:
    """(5200,9230) for a SEG over ``n_src`` source frames x ``n_seg`` segments, frame-major.

    Each item: Derivation Image macro (source frame j of ``src``), Frame Content (Dimension Index Values
    [segment, j], Temporal Position Index j) and Segmentation macro (Referenced Segment Number). Encoded
    directly: building thousands of pydicom datasets dominated the export time.
    """
    src_head = _el(0x00081150, "UI", src.sop_class_uid.encode("ascii")) + _el(
        0x00081155, "UI", src.sop_instance_uid.encode("ascii")
    )
    src_tail = _el(0x0028135A, "CS", b"YES") + _sq(0x0040A170, [_encode_item(purpose)])
    der_code = _sq(0x00089215, [_encode_item(derivation_code)])
    items: list[bytes] = []
    for j in range(1, n_src + 1):
        src_item = src_head + _el(0x00081160, "IS", str(j).encode("ascii")) + src_tail
        derivation = _sq(0x00089124, [_sq(0x00082112, [src_item]) + der_code])
        for k in range(1, n_seg + 1):
            content = _el(0x00209128, "UL", struct.pack("<I", j)) + _el(
                0x00209157, "UL", struct.pack("<II", k, j)
            )
            items.append(
                derivation
                + _sq(0x00209111, [content])
                + _sq(0x0062000A, [_el(0x0062000B, "US", struct.pack("<H", k))])
            )
    return _sq(_PER_FRAME_FG, items)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mapped_file(a: npt.NDArray[np.generic]) -> mmap.mmap | None:
    """The shared memory map under a ``np.memmap`` source (opened "r", "r+" or "w+"), if any.

    Copy-on-write maps ("c") are left alone: dropping their pages would discard the caller's changes.
    """
    if not isinstance(a, np.memmap) or a.mode not in ("r", "r+", "w+"):
        return None
    base = a.base
    return base if isinstance(base, mmap.mmap) else None


def _pixel_blocks(st: _Stack, i0: int, i1: int) -> Iterator[memoryview]:
    mapped = _mapped_file(st.source) if isinstance(st.source, np.ndarray) else None
    for b in range(i0, i1, _BLOCK_FRAMES):
        blk = _gray_block(st.block(b, min(i1, b + _BLOCK_FRAMES)))
        if blk.dtype == np.uint16 and blk.dtype.byteorder == ">":
            blk = blk.astype("<u2")
        yield np.ascontiguousarray(blk).data.cast("B")
        if mapped is not None and not mapped.closed:
            # Pages of a memory-mapped source were read once and are done with: unmap them so a long
            # spilled recording does not count (up to its whole size) towards our resident memory.
            mapped.madvise(mmap.MADV_DONTNEED)


def _gray_block(blk: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    return blk[..., 0] if blk.ndim == 4 and blk.shape[3] == 1 else blk


# ========================================================================================= US cine
def write_us_cine(
    images: Images,
    out_dir: Path,
    study: PatientStudy,
    *,
    times_s: Sequence[float] | npt.NDArray[np.floating] | None = None,
    fps: float | None = None,
    spacing_mm: tuple[float, float] | None = None,
    series: SeriesInfo | None = None,
    equipment: Equipment = Equipment(),
    start_time: _dt.datetime | None = None,
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    first_frame: int = 0,
) -> list[WrittenObject]:
    """Write ultrasound frames as Ultrasound Multi-frame Image Storage (PS3.3 A.7) instances.

    Args:
        images: (N, rows, cols) uint8 array or a sequence of uint8 Frames. (The US Image module allows
            only 8-bit grayscale; archive 16-bit data with :func:`write_secondary_capture`.)
        times_s: per-frame times in seconds (any origin); default from the Frames' receive clock or ``fps``.
        spacing_mm: (x, y) pixel spacing in mm; written as US Region Calibration. None: not calibrated.
        max_instance_bytes: split point; each part is one instance of the same series.
    """
    st, rows, cols, dtype = _stack(images)
    if dtype != np.uint8:
        raise ValueError(
            "US Multi-frame Image allows only 8-bit grayscale; use write_secondary_capture for uint16"
        )
    _require_resolved(study)
    t = frame_times_s(images, times_s, fps)
    spacing = _spacing(images, spacing_mm)
    start = _start_datetime(images, start_time)
    series = series or SeriesInfo(1, "Ultrasound cine")
    out: list[WrittenObject] = []
    for part, (i0, i1) in enumerate(_parts(len(st), rows * cols, max_instance_bytes), start=1):
        uid = new_uid()
        t_part = start + _dt.timedelta(seconds=float(t[i0] - t[0]))
        ds = _base_dataset(
            US_MULTIFRAME,
            uid,
            study=study,
            series=series,
            modality="US",
            equipment=equipment,
            instance_number=part,
            content_time=t_part,
        )
        # General Image (C.7.6.1): no Image Orientation (Patient) -> Patient Orientation is type 2C, empty
        ds.PatientOrientation = ""
        ds.BurnedInAnnotation = "NO"
        # General Acquisition (C.7.10.1)
        ds.AcquisitionDateTime = t_part.strftime("%Y%m%d%H%M%S.%f")
        # US Image (C.8.5.6): fixed values for 8-bit grayscale
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        _image_pixel(ds, rows, cols, dtype, "MONOCHROME2")
        ds.LossyImageCompression = "00"
        # Cine (C.7.6.5) + Multi-frame (C.7.6.6)
        _add_cine(ds, t[i0:i1])
        # US Region Calibration (C.8.5.5): one tissue region over the whole image, physical units cm
        if spacing is not None:
            region = Dataset()
            region.RegionSpatialFormat = 1  # 2D
            region.RegionDataType = 1  # tissue
            region.RegionFlags = 0
            region.RegionLocationMinX0 = 0
            region.RegionLocationMinY0 = 0
            region.RegionLocationMaxX1 = cols - 1
            region.RegionLocationMaxY1 = rows - 1
            region.PhysicalUnitsXDirection = 3  # cm
            region.PhysicalUnitsYDirection = 3
            region.PhysicalDeltaX = spacing[0] / 10.0
            region.PhysicalDeltaY = spacing[1] / 10.0
            ds.SequenceOfUltrasoundRegions = DicomSequence([region])
        path = out_dir / f"US_{series.number:03d}_{part:04d}.dcm"
        size = _write_file(path, ds, "OB", _pixel_blocks(st, i0, i1), (i1 - i0) * rows * cols)
        out.append(
            WrittenObject(
                path,
                "us-cine",
                US_MULTIFRAME,
                uid,
                series.uid,
                study.study_instance_uid,
                i1 - i0,
                first_frame + i0,
                size,
            )
        )
        logger.info("Wrote US cine part %d: %d frames, %d bytes", part, i1 - i0, size)
    return out


# ================================================================================= Secondary Capture
def write_secondary_capture(
    images: Images,
    out_dir: Path,
    study: PatientStudy,
    *,
    modality: str = "XF",
    times_s: Sequence[float] | npt.NDArray[np.floating] | None = None,
    fps: float | None = None,
    spacing_mm: tuple[float, float] | None = None,
    burned_in_annotation: bool = True,
    bits_stored: int | None = None,
    series: SeriesInfo | None = None,
    equipment: Equipment = Equipment(),
    start_time: _dt.datetime | None = None,
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    first_frame: int = 0,
) -> list[WrittenObject]:
    """Write frame-grabbed frames as Multi-frame Grayscale Byte (uint8) or Word (uint16) Secondary Capture.

    ``burned_in_annotation`` defaults to True: a frame grabber copies the monitor, which may show the
    patient's name; say False only when the source is known to carry no identifying text.
    ``modality`` "XF" (frame-grabbed fluoroscopy) is written as DICOM modality RF.
    """
    st, rows, cols, dtype = _stack(images)
    dicom_modality = _SC_MODALITIES.get(modality.upper())
    if dicom_modality is None:
        raise ValueError(f"unknown modality {modality!r}; one of {', '.join(_SC_MODALITIES)}")
    _require_resolved(study)
    t = frame_times_s(images, times_s, fps)
    spacing = _spacing(images, spacing_mm)
    start = _start_datetime(images, start_time)
    series = series or SeriesInfo(1, "Fluoroscopy (frame grab)")
    sop_class = SC_MULTIFRAME_BYTE if dtype == np.uint8 else SC_MULTIFRAME_WORD
    bits = 8 if dtype == np.uint8 else (bits_stored or 16)
    if not 9 <= bits <= 16 and dtype == np.uint16:
        raise ValueError("bits_stored for 16-bit frames must be 9..16")
    out: list[WrittenObject] = []
    for part, (i0, i1) in enumerate(
        _parts(len(st), rows * cols * dtype.itemsize, max_instance_bytes), start=1
    ):
        uid = new_uid()
        t_part = start + _dt.timedelta(seconds=float(t[i0] - t[0]))
        ds = _base_dataset(
            sop_class,
            uid,
            study=study,
            series=series,
            modality=dicom_modality,
            equipment=equipment,
            instance_number=part,
            content_time=t_part,
        )
        ds.PatientOrientation = ""  # General Image, type 2C
        ds.ImageType = ["DERIVED", "SECONDARY"]
        # SC Equipment (C.8.6.1)
        ds.ConversionType = "DV"  # digitized video
        ds.SecondaryCaptureDeviceManufacturer = equipment.manufacturer
        ds.SecondaryCaptureDeviceManufacturerModelName = equipment.model_name
        ds.SecondaryCaptureDeviceSoftwareVersions = equipment.software_version
        # SC Image (C.8.6.2)
        ds.DateOfSecondaryCapture = _da(t_part)
        ds.TimeOfSecondaryCapture = _tm(t_part)
        _image_pixel(ds, rows, cols, dtype, "MONOCHROME2")
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        # SC Multi-frame Image (C.8.6.3)
        ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"  # unspecified units
        if spacing is not None:
            ds.PixelSpacing = [spacing[1], spacing[0]]  # row, column spacing
            ds.PixelSpacingCalibrationType = "GEOMETRY"
            ds.PixelSpacingCalibrationDescription = "Frame grabber calibration from the stream"
        # Cine (C.7.6.5) + Multi-frame (C.7.6.6)
        _add_cine(ds, t[i0:i1])
        ds.LossyImageCompression = "00"
        path = out_dir / f"SC_{series.number:03d}_{part:04d}.dcm"
        vr = "OB" if dtype == np.uint8 else "OW"
        size = _write_file(path, ds, vr, _pixel_blocks(st, i0, i1), (i1 - i0) * rows * cols * dtype.itemsize)
        out.append(
            WrittenObject(
                path,
                "sc",
                sop_class,
                uid,
                series.uid,
                study.study_instance_uid,
                i1 - i0,
                first_frame + i0,
                size,
            )
        )
        logger.info("Wrote SC part %d: %d frames, %d bytes", part, i1 - i0, size)
    return out


# ====================================================================================== Segmentation
def _mask_stack(masks: npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]]) -> _MaskStack:
    return _MaskStack(masks)


@dataclass(frozen=True, slots=True, eq=False)
class _MaskStack:
    source: npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]]

    def __len__(self) -> int:
        return len(self.source)

    def block(self, i0: int, i1: int) -> npt.NDArray[np.uint8]:
        if isinstance(self.source, np.ndarray):
            return np.asarray(self.source[i0:i1])
        return np.stack([np.asarray(m) for m in self.source[i0:i1]])


def _seg_blocks(ms: _MaskStack, i0: int, i1: int, labels: Sequence[int]) -> Iterator[bytes]:
    """Pack (source frame, segment) frames, frame-major, 1 bit per pixel, LSB first (PS3.5 8.1.1)."""
    values = np.asarray(labels, dtype=np.uint8)[None, :, None, None]
    for b in range(i0, i1, _BLOCK_FRAMES):  # _BLOCK_FRAMES is a multiple of 8: blocks stay byte-aligned
        blk = ms.block(b, min(i1, b + _BLOCK_FRAMES))
        bits = blk[:, None, :, :] == values
        yield np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def write_segmentation(
    masks: npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]],
    sources: Sequence[WrittenObject],
    out_dir: Path,
    study: PatientStudy,
    *,
    algorithm: AlgorithmInfo = AlgorithmInfo(),
    labels: Sequence[int] = (INSTRUMENT, TARGET),
    series: SeriesInfo | None = None,
    equipment: Equipment = Equipment(),
) -> list[WrittenObject]:
    """Write label maps as binary Segmentation (PS3.3 A.51) instances, one per source instance.

    Each SEG frame is one (source frame, segment) pair and references its source frame by SOP Instance
    UID and Referenced Frame Number (Derivation Image macro), so a reader can look masks up by source
    frame. Every pair is written, empty or not, so the SEG is complete by construction.

    Args:
        masks: (N, rows, cols) uint8 label maps, one per source frame (values index
            :data:`engines.base.CLASS_NAMES`), covering exactly the frames of ``sources``.
        sources: the image instances written for the same frames (from :func:`write_us_cine` or
            :func:`write_secondary_capture`), in order.
        labels: which label values become segments (1 = instrument, 2 = target).
    """
    ms = _mask_stack(masks)
    total = sum(s.frames for s in sources)
    if len(ms) != total:
        raise ValueError(f"{len(ms)} masks for {total} source frames")
    unknown = [v for v in labels if v not in _SEGMENT_CODES]
    if unknown:
        raise ValueError(
            f"no segment definition for label value(s) {unknown}; known {sorted(_SEGMENT_CODES)}"
        )
    first = ms.block(0, 1)[0]
    rows, cols = int(first.shape[0]), int(first.shape[1])
    _require_resolved(study)
    if sources and sources[0].study_instance_uid != study.study_instance_uid:
        raise ValueError("the segmentation must belong to the same study as its source images")
    series = series or SeriesInfo(100, "Needle and target segmentation (AI)")
    content_time = _dt.datetime.now()
    segment_seq = DicomSequence()
    for number, value in enumerate(labels, start=1):
        label, category, type_ = _SEGMENT_CODES[value]
        seg = Dataset()
        seg.SegmentNumber = number
        seg.SegmentLabel = label
        seg.SegmentDescription = f"label value {value} ({CLASS_NAMES[value]})"
        seg.SegmentedPropertyCategoryCodeSequence = DicomSequence([_code(category)])
        seg.SegmentedPropertyTypeCodeSequence = DicomSequence([_code(type_)])
        seg.SegmentAlgorithmType = "AUTOMATIC"
        seg.SegmentAlgorithmName = algorithm.name
        alg = Dataset()  # Algorithm Identification macro (C.8.20.2 / 10.16)
        alg.AlgorithmFamilyCodeSequence = DicomSequence([_code(algorithm.family)])
        alg.AlgorithmName = algorithm.name
        alg.AlgorithmVersion = algorithm.version
        seg.SegmentationAlgorithmIdentificationSequence = DicomSequence([alg])
        segment_seq.append(seg)

    out: list[WrittenObject] = []
    offset = 0
    for part, src in enumerate(sources, start=1):
        uid = new_uid()
        n_src = src.frames
        ds = _base_dataset(
            SEGMENTATION,
            uid,
            study=study,
            series=series,
            modality="SEG",
            equipment=equipment,
            instance_number=part,
            content_time=content_time,
        )
        # Enhanced General Equipment (C.7.5.2): all type 1 (already set by _base_dataset)
        # Segmentation Image (C.8.20.2)
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.PatientOrientation = ""  # General Image, type 2C
        ds.ContentLabel = "NEEDLE_TARGET"
        ds.ContentDescription = "Needle/catheter and target segmentation"
        ds.ContentCreatorName = ""
        ds.SegmentationType = "BINARY"
        ds.SegmentSequence = segment_seq
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 1
        ds.BitsStored = 1
        ds.HighBit = 0
        ds.PixelRepresentation = 0
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
        # Common Instance Reference (C.12.2): the source series/instance
        ref_inst = Dataset()
        ref_inst.ReferencedSOPClassUID = src.sop_class_uid
        ref_inst.ReferencedSOPInstanceUID = src.sop_instance_uid
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = src.series_instance_uid
        ref_series.ReferencedInstanceSequence = DicomSequence([ref_inst])
        ds.ReferencedSeriesSequence = DicomSequence([ref_series])
        # Multi-frame Dimension (C.7.6.17): segment number x source frame (temporal position)
        dim_uid = new_uid()
        org = Dataset()
        org.DimensionOrganizationUID = dim_uid
        ds.DimensionOrganizationSequence = DicomSequence([org])
        d1 = Dataset()
        d1.DimensionOrganizationUID = dim_uid
        d1.DimensionIndexPointer = Tag(0x0062, 0x000B)  # Referenced Segment Number
        d1.FunctionalGroupPointer = Tag(0x0062, 0x000A)  # Segment Identification Sequence
        d1.DimensionDescriptionLabel = "Segment"
        d2 = Dataset()
        d2.DimensionOrganizationUID = dim_uid
        d2.DimensionIndexPointer = Tag(0x0020, 0x9128)  # Temporal Position Index
        d2.FunctionalGroupPointer = Tag(0x0020, 0x9111)  # Frame Content Sequence
        d2.DimensionDescriptionLabel = "Source frame"
        ds.DimensionIndexSequence = DicomSequence([d1, d2])
        # Multi-frame Functional Groups (C.7.6.16)
        # No Pixel Measures: without a Frame of Reference it is optional, and its Slice Thickness would be
        # invented for 2-D ultrasound. The SEG grid is the source grid; spacing lives in the source image.
        shared = Dataset()
        purpose = _code(("121322", "DCM", "Source image for image processing operation"))
        derivation_code = _code(("113076", "DCM", "Segmentation"))
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        # Per-frame Functional Groups: thousands of items, pre-encoded as bytes (not pydicom datasets)
        per_frame = _seg_per_frame_groups(src, n_src, len(labels), purpose, derivation_code)
        ds.NumberOfFrames = n_src * len(labels)
        length = (n_src * len(labels) * rows * cols + 7) // 8
        path = out_dir / f"SEG_{series.number:03d}_{part:04d}.dcm"
        size = _write_file(
            path,
            ds,
            "OB",
            _seg_blocks(ms, offset, offset + n_src, labels),
            length,
            per_frame_groups=per_frame,
        )
        out.append(
            WrittenObject(
                path,
                "seg",
                SEGMENTATION,
                uid,
                series.uid,
                study.study_instance_uid,
                n_src * len(labels),
                src.first_frame,
                size,
            )
        )
        logger.info("Wrote SEG part %d: %d frames, %d bytes", part, n_src * len(labels), size)
        offset += n_src
    return out


# ================================================================================ burned-in overlay
#: Contour colours (RGB) drawn by :func:`write_overlay`, per label value.
OVERLAY_COLOURS: dict[int, tuple[int, int, int]] = {INSTRUMENT: (255, 220, 0), TARGET: (0, 200, 255)}
OVERLAY_SERIES_DESCRIPTION = "AI overlay (burned in): needle/target contours"  # LO: <= 64


def _contours(mask: npt.NDArray[np.bool_], width: int = 2) -> npt.NDArray[np.bool_]:
    """Inner boundary of ``mask`` (N, rows, cols), ``width`` pixels wide (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        e = inner.copy()
        e[:, 1:, :] &= inner[:, :-1, :]
        e[:, :-1, :] &= inner[:, 1:, :]
        e[:, :, 1:] &= inner[:, :, :-1]
        e[:, :, :-1] &= inner[:, :, 1:]
        e[:, 0, :] = e[:, -1, :] = False  # the image edge closes the contour
        e[:, :, 0] = e[:, :, -1] = False
        inner = e
    out: npt.NDArray[np.bool_] = mask & ~inner
    return out


def _overlay_blocks(
    st: _Stack, ms: _MaskStack, i0: int, i1: int, labels: Sequence[int]
) -> Iterator[memoryview]:
    for b in range(i0, i1, _BLOCK_FRAMES):
        e = min(i1, b + _BLOCK_FRAMES)
        gray = _gray_block(st.block(b, e))
        if gray.dtype == np.uint16:
            gray = (np.asarray(gray, np.uint16) >> 8).astype(np.uint8)  # 16-bit: shown at the top 8 bits
        rgb = np.repeat(np.asarray(gray, np.uint8)[..., None], 3, axis=3)
        lab = ms.block(b, e)
        for value in labels:
            rgb[_contours(lab == value)] = OVERLAY_COLOURS[value]
        yield rgb.data.cast("B")


def write_overlay(
    images: Images,
    masks: npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]],
    sources: Sequence[WrittenObject],
    out_dir: Path,
    study: PatientStudy,
    *,
    labels: Sequence[int] = (INSTRUMENT, TARGET),
    modality: str = "US",
    times_s: Sequence[float] | npt.NDArray[np.floating] | None = None,
    fps: float | None = None,
    series: SeriesInfo | None = None,
    equipment: Equipment = Equipment(),
    start_time: _dt.datetime | None = None,
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
) -> list[WrittenObject]:
    """Write a derived copy of the frames with the AI's contours burned in, as Multi-frame True Color
    Secondary Capture (PS3.3 A.8.5) in its own series, labelled as such.

    The pixels are the source frames in gray with the contour of each label in ``labels`` drawn in its
    :data:`OVERLAY_COLOURS` colour; Image Type is DERIVED\\SECONDARY, Burned In Annotation YES, and the
    Source Image Sequence references the source instance and frames each overlay instance was made from.
    RGB is three times the source's size, so instances are split by their own size limit.

    Args:
        images, masks: the source frames and their label maps (same count, same geometry).
        sources: the image instances written for the same frames (from :func:`write_us_cine` or
            :func:`write_secondary_capture`), in order.
        modality: as given to the source's writer ("US", "XF", "RF", "XA", "OT").
    """
    dicom_modality = _SC_MODALITIES.get(modality.upper())
    if dicom_modality is None:
        raise ValueError(f"unknown modality {modality!r}; one of {', '.join(_SC_MODALITIES)}")
    st, rows, cols, _ = _stack(images)
    ms = _mask_stack(masks)
    total = sum(s.frames for s in sources)
    if len(st) != total or len(ms) != total:
        raise ValueError(f"{len(st)} frames and {len(ms)} masks for {total} source frames")
    unknown = [v for v in labels if v not in OVERLAY_COLOURS]
    if unknown:
        raise ValueError(f"no overlay colour for label value(s) {unknown}")
    _require_resolved(study)
    t = frame_times_s(images, times_s, fps)
    start = _start_datetime(images, start_time)
    series = series or SeriesInfo(200, OVERLAY_SERIES_DESCRIPTION)
    out: list[WrittenObject] = []
    instance = 0
    offset = 0
    for src in sources:
        for p0, p1 in _parts(src.frames, rows * cols * 3, max_instance_bytes):
            i0, i1 = offset + p0, offset + p1
            instance += 1
            uid = new_uid()
            t_part = start + _dt.timedelta(seconds=float(t[i0] - t[0]))
            ds = _base_dataset(
                SC_MULTIFRAME_RGB,
                uid,
                study=study,
                series=series,
                modality=dicom_modality,
                equipment=equipment,
                instance_number=instance,
                content_time=t_part,
            )
            ds.PatientOrientation = ""  # General Image, type 2C
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.DerivationDescription = "AI segmentation contours (needle/catheter, target) drawn into pixels"
            ref = Dataset()  # General Image: Source Image Sequence (the frames this copy was made from)
            ref.ReferencedSOPClassUID = src.sop_class_uid
            ref.ReferencedSOPInstanceUID = src.sop_instance_uid
            ref.ReferencedFrameNumber = list(range(p0 + 1, p1 + 1)) if p1 - p0 > 1 else p0 + 1
            ref.PurposeOfReferenceCodeSequence = DicomSequence(
                [_code(("121322", "DCM", "Source image for image processing operation"))]
            )
            ds.SourceImageSequence = DicomSequence([ref])
            # SC Equipment (C.8.6.1)
            ds.ConversionType = "WSD"  # workstation: rendered by us, not digitized
            ds.SecondaryCaptureDeviceManufacturer = equipment.manufacturer
            ds.SecondaryCaptureDeviceManufacturerModelName = equipment.model_name
            ds.SecondaryCaptureDeviceSoftwareVersions = equipment.software_version
            # SC Image (C.8.6.2)
            ds.DateOfSecondaryCapture = _da(t_part)
            ds.TimeOfSecondaryCapture = _tm(t_part)
            _image_pixel(ds, rows, cols, np.dtype(np.uint8), "RGB")
            # SC Multi-frame Image (C.8.6.3): the contours are burned-in annotation
            ds.BurnedInAnnotation = "YES"
            ds.RecognizableVisualFeatures = "NO"
            # Cine (C.7.6.5) + Multi-frame (C.7.6.6)
            _add_cine(ds, t[i0:i1])
            ds.LossyImageCompression = "00"
            path = out_dir / f"OV_{series.number:03d}_{instance:04d}.dcm"
            size = _write_file(
                path, ds, "OB", _overlay_blocks(st, ms, i0, i1, labels), (i1 - i0) * rows * cols * 3
            )
            out.append(
                WrittenObject(
                    path,
                    "overlay",
                    SC_MULTIFRAME_RGB,
                    uid,
                    series.uid,
                    study.study_instance_uid,
                    i1 - i0,
                    src.first_frame + p0,
                    size,
                )
            )
            logger.info("Wrote overlay part %d: %d frames, %d bytes", instance, i1 - i0, size)
        offset += src.frames
    return out
