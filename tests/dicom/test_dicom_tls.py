"""DICOM TLS against dcmtk storescp (+tls, peer certificates required), with self-signed certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from guidance.cli import main
from guidance.dicom.export import ExportOptions, archive
from guidance.dicom.network import DicomNode, echo, make_tls_context
from guidance.dicom.study import PatientStudy

pytestmark = pytest.mark.dicom
Cine = tuple[np.ndarray, np.ndarray, np.ndarray]


def _node(scp: Any, our_aet: str, certs: Any, ca: Path | None = None) -> DicomNode:
    ctx = make_tls_context(ca or certs.server_crt, certs.client_crt, certs.client_key)
    return DicomNode("127.0.0.1", scp.port, scp.aet, our_aet, tls=ctx, tls_server_hostname="localhost")


def test_dicom_tls_echo_and_store(  # noqa: PLR0917 - fixtures
    tls_storescp: Any,
    tls_certs: Any,
    our_aet: str,
    tmp_path: Path,
    study: PatientStudy,
    cine: Cine,
) -> None:
    images, times, masks = cine
    node = _node(tls_storescp, our_aet, tls_certs)
    res = echo(node)
    assert res.ok, res.message
    out = archive(images, node, tmp_path / "spool", study, masks=masks, options=ExportOptions(times_s=times))
    assert (out.report.stored, out.pending, out.parked) == (2, 0, 0)
    got = sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in tls_storescp.files()
    )
    assert got == sorted(o.sop_instance_uid for o in out.objects)


def test_dicom_tls_untrusted_certificate_says_why(tls_storescp: Any, tls_certs: Any, our_aet: str) -> None:
    res = echo(_node(tls_storescp, our_aet, tls_certs, ca=tls_certs.other_crt))
    assert not res.ok
    assert "certificate" in res.message
    assert "not trusted" in res.message


def test_dicom_tls_plain_client_is_refused(tls_storescp: Any, our_aet: str) -> None:
    res = echo(DicomNode("127.0.0.1", tls_storescp.port, tls_storescp.aet, our_aet))
    assert not res.ok


def test_dicom_cli_echo_tls(
    tls_storescp: Any, tls_certs: Any, our_aet: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "archive",
        "--echo",
        "--host",
        "127.0.0.1",
        "--port",
        str(tls_storescp.port),
        "--aec",
        tls_storescp.aet,
        "--aet",
        our_aet,
        "--tls-ca",
        str(tls_certs.server_crt),
        "--tls-cert",
        str(tls_certs.client_crt),
        "--tls-key",
        str(tls_certs.client_key),
        "--tls-hostname",
        "localhost",
    ]
    assert main(args) == 0
    assert "echo OK" in capsys.readouterr().err
