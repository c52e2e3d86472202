"""Writers: every object type passes dciodvfy with zero errors and reads back exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from guidance.dicom.study import PatientStudy, StudyValidationError, manual_entry
from guidance.dicom.writers import (
    OVERLAY_COLOURS,
    SC_MULTIFRAME_BYTE,
    SC_MULTIFRAME_RGB,
    SC_MULTIFRAME_WORD,
    SEGMENTATION,
    US_MULTIFRAME,
    AlgorithmInfo,
    SeriesInfo,
    write_overlay,
    write_secondary_capture,
    write_segmentation,
    write_us_cine,
)
from streaming.frame import Frame

Cine = tuple[np.ndarray, np.ndarray, np.ndarray]


def test_dicom_us_cine_valid_and_exact(
    tmp_path: Path, study: PatientStudy, cine: Cine, dciodvfy: Any
) -> None:
    images, times, _ = cine
    (obj,) = write_us_cine(images, tmp_path, study, times_s=times, spacing_mm=(0.2, 0.25))
    assert obj.sop_class_uid == US_MULTIFRAME
    assert obj.frames == len(images)
    assert dciodvfy(obj.path) == []
    ds = pydicom.dcmread(obj.path)
    np.testing.assert_array_equal(ds.pixel_array, images)
    # jittered times -> Frame Time Vector, first value 0, intervals in ms
    assert ds.FrameIncrementPointer == 0x00181065
    np.testing.assert_allclose([float(v) for v in ds.FrameTimeVector[1:]], np.diff(times) * 1e3, atol=1e-3)
    region = ds.SequenceOfUltrasoundRegions[0]
    assert (float(region.PhysicalDeltaX), float(region.PhysicalDeltaY)) == (0.02, 0.025)
    assert ds.StudyInstanceUID == study.study_instance_uid


def test_dicom_us_cine_regular_rate_uses_frame_time(tmp_path: Path, study: PatientStudy, cine: Cine) -> None:
    images, _, _ = cine
    (obj,) = write_us_cine(images, tmp_path, study, fps=25.0)
    ds = pydicom.dcmread(obj.path, stop_before_pixels=True)
    assert ds.FrameIncrementPointer == 0x00181063
    assert float(ds.FrameTime) == 40.0
    assert "SequenceOfUltrasoundRegions" not in ds  # no calibration invented


def test_dicom_us_cine_rejects_16_bit(tmp_path: Path, study: PatientStudy) -> None:
    with pytest.raises(ValueError, match="8-bit"):
        write_us_cine(np.zeros((2, 4, 4), np.uint16), tmp_path, study, fps=10)


def test_dicom_secondary_capture_byte_and_word(
    tmp_path: Path, study: PatientStudy, cine: Cine, dciodvfy: Any
) -> None:
    images, times, _ = cine
    (byte,) = write_secondary_capture(
        images, tmp_path, study, modality="XF", times_s=times, spacing_mm=(0.3, 0.3)
    )
    words = (images.astype(np.uint16) * 16).astype(np.uint16)  # 12 significant bits
    (word,) = write_secondary_capture(
        words,
        tmp_path,
        study,
        fps=15,
        bits_stored=12,
        series=SeriesInfo(2, "16-bit"),
        burned_in_annotation=False,
    )
    assert (byte.sop_class_uid, word.sop_class_uid) == (SC_MULTIFRAME_BYTE, SC_MULTIFRAME_WORD)
    assert dciodvfy(byte.path) == []
    assert dciodvfy(word.path) == []
    b = pydicom.dcmread(byte.path)
    w = pydicom.dcmread(word.path)
    np.testing.assert_array_equal(b.pixel_array, images)
    np.testing.assert_array_equal(w.pixel_array, words)
    assert b.Modality == "RF"
    assert b.ConversionType == "DV"
    assert b.BurnedInAnnotation == "YES"
    assert w.BurnedInAnnotation == "NO"
    assert w.PresentationLUTShape == "IDENTITY"
    assert w.BitsStored == 12


def test_dicom_seg_valid_and_read_back_by_source_frame(
    tmp_path: Path, study: PatientStudy, cine: Cine, dciodvfy: Any
) -> None:
    images, times, masks = cine
    src = write_us_cine(images, tmp_path, study, times_s=times)
    (seg,) = write_segmentation(masks, src, tmp_path, study, algorithm=AlgorithmInfo("unet-test", "1.2"))
    assert seg.sop_class_uid == SEGMENTATION
    assert seg.frames == 2 * len(images)
    assert dciodvfy(seg.path) == []
    s = hd.seg.segread(seg.path)
    assert s.number_of_segments == 2
    desc = s.get_segment_description(1)
    assert desc.algorithm_identification is not None
    alg = desc.algorithm_identification[0]
    assert alg.AlgorithmName == "unet-test"
    assert alg.AlgorithmVersion == "1.2"
    assert desc.SegmentAlgorithmName == "unet-test"
    # read back in a scrambled order of source frames
    order = [5, 1, 12, 4, 8]
    got = s.get_pixels_by_source_frame(
        source_sop_instance_uid=src[0].sop_instance_uid, source_frame_numbers=order, combine_segments=True
    )
    np.testing.assert_array_equal(got, masks[[i - 1 for i in order]])


def test_dicom_long_recording_is_split(
    tmp_path: Path, study: PatientStudy, cine: Cine, dciodvfy: Any
) -> None:
    images, times, masks = cine
    limit = 1_000_000 + 5 * images[0].nbytes  # 5 frames per instance
    src = write_us_cine(images, tmp_path, study, times_s=times, max_instance_bytes=limit)
    assert [o.frames for o in src] == [5, 5, 2]
    assert [o.first_frame for o in src] == [0, 5, 10]
    assert len({o.series_instance_uid for o in src}) == 1
    assert len({o.sop_instance_uid for o in src}) == 3
    segs = write_segmentation(masks, src, tmp_path, study)
    assert len(segs) == 3
    for s_obj, part in zip(segs, src, strict=True):
        assert dciodvfy(s_obj.path) == []
        s = hd.seg.segread(s_obj.path)
        got = s.get_pixels_by_source_frame(
            source_sop_instance_uid=part.sop_instance_uid,
            source_frame_numbers=list(range(1, part.frames + 1)),
            combine_segments=True,
        )
        np.testing.assert_array_equal(got, masks[part.first_frame : part.first_frame + part.frames])
    for part in src:
        ds = pydicom.dcmread(part.path)
        np.testing.assert_array_equal(
            ds.pixel_array, images[part.first_frame : part.first_frame + part.frames]
        )


def test_dicom_frames_input_uses_frame_clock_and_spacing(
    tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, _ = cine
    frames = [
        Frame(
            seq=i,
            device="US",
            pixels=images[i],
            spacing_mm=(0.1, 0.2),
            receive_ns=int(t * 1e9) + 10**12,
            receive_wall_ns=1_700_000_000 * 10**9 + int(t * 1e9),
        )
        for i, t in enumerate(times)
    ]
    (obj,) = write_us_cine(frames, tmp_path, study)
    ds = pydicom.dcmread(obj.path)
    np.testing.assert_array_equal(ds.pixel_array, images)
    assert float(ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaY) == pytest.approx(0.02)
    np.testing.assert_allclose([float(v) for v in ds.FrameTimeVector[1:]], np.diff(times) * 1e3, atol=1e-3)


def test_dicom_files_are_written_atomically(tmp_path: Path, study: PatientStudy, cine: Cine) -> None:
    images, _, _ = cine
    write_us_cine(images, tmp_path, study, fps=30)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dicom_manual_entry_validation() -> None:
    st = manual_entry("Doe, Jane", "P-1", birth_date="1970-01-31", sex="f")
    assert (st.patient_name, st.birth_date, st.sex) == ("Doe^Jane", "19700131", "F")
    assert "Doe" not in repr(st)
    assert "P-1" not in repr(st)
    for kwargs, field in [
        ({"patient_name": "", "patient_id": "1"}, "patient_name"),
        ({"patient_name": "A^B", "patient_id": ""}, "patient_id"),
        ({"patient_name": "A^B", "patient_id": "1", "birth_date": "19701332"}, "birth_date"),
        ({"patient_name": "A^B", "patient_id": "1", "birth_date": "29990101"}, "birth_date"),
        ({"patient_name": "A^B", "patient_id": "1", "sex": "X"}, "sex"),
        ({"patient_name": "A\\B", "patient_id": "1"}, "patient_name"),
        ({"patient_name": "A^B", "patient_id": "x" * 65}, "patient_id"),
        ({"patient_name": "A^B", "patient_id": "1", "accession_number": "x" * 17}, "accession_number"),
    ]:
        with pytest.raises(StudyValidationError, match=field):
            manual_entry(**kwargs)
    with pytest.raises(StudyValidationError, match="study_instance_uid"):
        PatientStudy("A^B", "1", study_instance_uid="1.02.3").validated()


def test_dicom_writers_require_a_resolved_study(tmp_path: Path, cine: Cine) -> None:
    images, _, _ = cine
    with pytest.raises(ValueError, match="resolve"):
        write_us_cine(images, tmp_path, manual_entry("A^B", "1"), fps=30)


def test_dicom_seg_per_frame_groups_read_back_with_pydicom(
    tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    """The pre-encoded per-frame functional groups decode to the expected references, frame-major."""
    images, times, masks = cine
    (src,) = write_us_cine(images, tmp_path, study, times_s=times)
    (seg,) = write_segmentation(masks, [src], tmp_path, study)
    ds = pydicom.dcmread(seg.path)
    groups = ds.PerFrameFunctionalGroupsSequence
    assert len(groups) == ds.NumberOfFrames == 2 * len(images)
    for idx, item in enumerate(groups):
        j, k = idx // 2 + 1, idx % 2 + 1
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert (ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber)) == (src.sop_instance_uid, j)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert item.DerivationImageSequence[0].DerivationCodeSequence[0].CodeValue == "113076"
        assert list(item.FrameContentSequence[0].DimensionIndexValues) == [k, j]
        assert item.FrameContentSequence[0].TemporalPositionIndex == j
        assert item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == k
    # a second, Python-side encoding of the same data set (pydicom) matches what we streamed
    again = tmp_path / "again.dcm"
    ds.save_as(again, enforce_file_format=True)
    assert pydicom.dcmread(again).PerFrameFunctionalGroupsSequence == groups


def test_dicom_memmap_source_written_exactly(tmp_path: Path, study: PatientStudy, cine: Cine) -> None:
    """A read-only memory-mapped source (a spilled recording) is written exactly; its pages are released."""
    images, times, _ = cine
    raw = tmp_path / "frames.raw"
    images.tofile(raw)
    mm = np.memmap(raw, dtype=np.uint8, mode="r", shape=images.shape)
    (obj,) = write_us_cine(mm, tmp_path / "out", study, times_s=times)
    np.testing.assert_array_equal(pydicom.dcmread(obj.path).pixel_array, images)
    np.testing.assert_array_equal(mm, images)  # still readable after the pages were dropped


def test_dicom_overlay_valid_labelled_and_referenced(
    tmp_path: Path, study: PatientStudy, cine: Cine, dciodvfy: Any
) -> None:
    images, times, masks = cine
    limit = 1_000_000 + 5 * images[0].nbytes  # source: 5 frames per instance -> parts of 5, 5, 2
    src = write_us_cine(images, tmp_path, study, times_s=times, max_instance_bytes=limit)
    ovs = write_overlay(images, masks, src, tmp_path, study, times_s=times, max_instance_bytes=limit)
    assert [o.frames for o in ovs] == [1] * len(images)  # RGB is 3x the size: split by its own limit
    limit = 1_000_000 + 30 * images[0].nbytes
    ovs = write_overlay(images, masks, src, tmp_path / "b", study, times_s=times, max_instance_bytes=limit)
    assert [o.frames for o in ovs] == [5, 5, 2]
    for ov, part in zip(ovs, src, strict=True):
        assert ov.sop_class_uid == SC_MULTIFRAME_RGB
        assert dciodvfy(ov.path) == []
        ds = pydicom.dcmread(ov.path)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES"
        assert "AI overlay" in ds.SeriesDescription
        assert ds.SeriesInstanceUID not in {s.series_instance_uid for s in src}
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == part.sop_instance_uid
        frames = ref.ReferencedFrameNumber
        assert [int(f) for f in (frames if part.frames > 1 else [frames])] == list(range(1, part.frames + 1))
        rgb = ds.pixel_array
        assert rgb.shape == (part.frames, *images.shape[1:], 3)
        sl = slice(part.first_frame, part.first_frame + part.frames)
        gray = np.repeat(images[sl][..., None], 3, axis=3)
        drawn = np.any(rgb != gray, axis=3)
        assert not np.any(drawn & (masks[sl] == 0))  # only contour pixels of the masks changed
        for value in (1, 2):
            on_edge = rgb[drawn & (masks[sl] == value)]
            assert on_edge.size
            assert np.all(on_edge == OVERLAY_COLOURS[value])
        # a mask's interior keeps the source pixels (contours, not filled areas)
        assert np.array_equal(rgb[:, 35, 50], gray[:, 35, 50])
