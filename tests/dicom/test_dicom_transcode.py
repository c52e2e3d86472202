"""Lossless compressed transfer syntaxes: negotiation, streamed copies, real peers that want compression."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from guidance.dicom.export import ExportOptions, archive
from guidance.dicom.network import DicomNode, StoreSession, choose_syntax
from guidance.dicom.study import PatientStudy
from guidance.dicom.transcode import (
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    lossless_syntaxes,
    proposed_syntaxes,
    transcode_file,
)
from guidance.dicom.writers import (
    SEGMENTATION,
    US_MULTIFRAME,
    SeriesInfo,
    WrittenObject,
    write_secondary_capture,
    write_segmentation,
    write_us_cine,
)

pytestmark = pytest.mark.dicom
Cine = tuple[np.ndarray, np.ndarray, np.ndarray]
EVRLE, IVRLE = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)


def test_dicom_proposed_and_chosen_syntaxes() -> None:
    assert proposed_syntaxes(US_MULTIFRAME)[:2] == [EVRLE, RLE_LOSSLESS]
    assert proposed_syntaxes(US_MULTIFRAME)[-1] == IVRLE
    assert proposed_syntaxes(SEGMENTATION) == [EVRLE, IVRLE]  # 1-bit frames stay uncompressed
    assert choose_syntax(EVRLE, US_MULTIFRAME, [EVRLE, RLE_LOSSLESS]) == EVRLE
    assert choose_syntax(EVRLE, US_MULTIFRAME, [RLE_LOSSLESS]) == RLE_LOSSLESS
    assert choose_syntax(EVRLE, US_MULTIFRAME, [IVRLE, RLE_LOSSLESS]) == IVRLE
    assert choose_syntax(EVRLE, US_MULTIFRAME, [EVRLE, RLE_LOSSLESS], prefer_compression=True) == RLE_LOSSLESS
    assert choose_syntax(EVRLE, SEGMENTATION, [RLE_LOSSLESS]) is None
    assert choose_syntax(EVRLE, US_MULTIFRAME, ["1.2.840.10008.1.2.4.50"]) is None  # lossy: never


@pytest.mark.parametrize("syntax", [RLE_LOSSLESS, JPEG_LS_LOSSLESS, IVRLE])
def test_dicom_transcoded_copies_valid_and_exact(
    tmp_path: Path, study: PatientStudy, cine: Cine, dciodvfy: Any, syntax: str
) -> None:
    if syntax not in (*lossless_syntaxes(US_MULTIFRAME), IVRLE):
        pytest.skip("JPEG-LS needs pyjpegls")
    images, times, masks = cine
    words = (images.astype(np.uint16) * 16).astype(np.uint16)
    (us,) = write_us_cine(images, tmp_path, study, times_s=times, spacing_mm=(0.2, 0.2))
    (sc,) = write_secondary_capture(words, tmp_path, study, fps=15, bits_stored=12, series=SeriesInfo(2, "w"))
    objs: list[tuple[WrittenObject, np.ndarray | None]] = [(us, images), (sc, words)]
    if syntax == IVRLE:
        (seg,) = write_segmentation(masks, [us], tmp_path, study)
        objs.append((seg, None))
    for obj, pixels in objs:
        dst = tmp_path / f"copy-{obj.path.name}"
        transcode_file(obj.path, dst, syntax)
        assert dciodvfy(dst) == [], obj.kind
        ds = pydicom.dcmread(dst)
        assert str(ds.file_meta.TransferSyntaxUID) == syntax
        assert ds.SOPInstanceUID == obj.sop_instance_uid  # never re-UIDed
        assert ds.LossyImageCompression == "00"
        if pixels is not None:
            np.testing.assert_array_equal(ds.pixel_array, pixels)
        else:
            assert ds.PixelData == pydicom.dcmread(obj.path).PixelData


def test_dicom_transcode_refuses_1_bit_compression(tmp_path: Path, study: PatientStudy, cine: Cine) -> None:
    images, times, masks = cine
    src = write_us_cine(images, tmp_path, study, times_s=times)
    (seg,) = write_segmentation(masks, src, tmp_path, study)
    with pytest.raises(ValueError, match="1-bit"):
        transcode_file(seg.path, tmp_path / "seg-rle.dcm", RLE_LOSSLESS)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_dicom_storescp_accepting_only_rle_gets_rle(  # noqa: PLR0917 - fixtures
    storescp_rle_only: Any, our_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine, dciodvfy: Any
) -> None:
    images, times, masks = cine
    node = DicomNode("127.0.0.1", storescp_rle_only.port, storescp_rle_only.aet, our_aet)
    with StoreSession(node, [US_MULTIFRAME, SEGMENTATION]) as session:
        assert session.accepted_syntaxes(US_MULTIFRAME) == [RLE_LOSSLESS]
        assert session.accepted_syntaxes(SEGMENTATION) == [EVRLE, IVRLE]
    res = archive(images, node, tmp_path / "spool", study, masks=masks, options=ExportOptions(times_s=times))
    assert (res.report.stored, res.pending, res.parked) == (2, 0, 0)
    got = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in storescp_rle_only.files()}
    assert set(got) == {o.sop_instance_uid for o in res.objects}
    us = pydicom.dcmread(got[res.objects[0].sop_instance_uid])
    assert str(us.file_meta.TransferSyntaxUID) == RLE_LOSSLESS
    np.testing.assert_array_equal(us.pixel_array, images)
    assert dciodvfy(got[res.objects[0].sop_instance_uid]) == []
    seg = pydicom.dcmread(got[res.objects[1].sop_instance_uid])
    assert str(seg.file_meta.TransferSyntaxUID) == EVRLE
    assert not list((tmp_path / "spool" / "objects").iterdir())  # originals and copies gone


def test_dicom_orthanc_accepts_and_stores_compressed(  # noqa: PLR0917 - fixtures
    orthanc: Any, our_aet: str, pacs_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    node = DicomNode("127.0.0.1", orthanc.dicom_port, pacs_aet, our_aet, prefer_compression=True)
    with StoreSession(node, [US_MULTIFRAME, SEGMENTATION]) as session:
        assert set(session.accepted_syntaxes(US_MULTIFRAME)) == {
            EVRLE,
            IVRLE,
            *lossless_syntaxes(US_MULTIFRAME),
        }
    res = archive(images, node, tmp_path / "spool", study, masks=masks, options=ExportOptions(times_s=times))
    assert res.report.stored == 2
    (found,) = orthanc.post(
        "/tools/find",
        {"Level": "Instance", "Query": {"SOPInstanceUID": res.objects[0].sop_instance_uid}},
    )
    assert orthanc.get_text(f"/instances/{found}/metadata/TransferSyntax") == RLE_LOSSLESS
    stored = tmp_path / "from-orthanc.dcm"
    stored.write_bytes(orthanc.get_bytes(f"/instances/{found}/file"))
    np.testing.assert_array_equal(pydicom.dcmread(stored).pixel_array, images)
