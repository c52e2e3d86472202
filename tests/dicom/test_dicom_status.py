"""C-STORE status policy against a real pynetdicom SCP answering chosen statuses."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pynetdicom import AE, evt

from guidance.dicom.export import ExportOptions, spool_objects
from guidance.dicom.network import DicomNode, classify_status
from guidance.dicom.spool import Archiver, RetryPolicy, Spool
from guidance.dicom.study import PatientStudy
from guidance.dicom.writers import SEGMENTATION, US_MULTIFRAME

Cine = tuple[np.ndarray, np.ndarray, np.ndarray]


class ScriptedSCP:
    """A storage SCP that answers the statuses in ``script`` in turn (then success)."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.received: list[str] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        ae = AE(ae_title="SCRIPTED")
        ae.add_supported_context(US_MULTIFRAME)
        ae.add_supported_context(SEGMENTATION)
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None
        self._server = server

    def _on_store(self, event: Any) -> int:
        status = self.script.pop(0) if self.script else 0x0000
        if status in (0x0000, 0xB000):
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return status

    def shutdown(self) -> None:
        self._server.shutdown()


@pytest.fixture
def scp() -> Iterator[ScriptedSCP]:
    s = ScriptedSCP()
    yield s
    s.shutdown()


def test_dicom_status_classification() -> None:
    assert classify_status(0x0000).category == "success"
    assert classify_status(0xB000).category == "warning"
    assert classify_status(0xA700).category == "transient"
    assert classify_status(0xA900).category == "permanent"
    assert classify_status(0xC123).category == "permanent"
    assert classify_status(0x0122).category == "permanent"


def test_dicom_transient_retried_permanent_parked(
    scp: ScriptedSCP, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    node = DicomNode("127.0.0.1", scp.port, "SCRIPTED", "GUIDANCE_TEST")
    policy = RetryPolicy(initial_s=0.05, max_s=0.1, max_attempts=10)
    with Spool(tmp_path / "spool") as spool:
        objs = spool_objects(images, spool, study, masks=masks, options=ExportOptions(times_s=times))
        us, seg = objs
        scp.script = [0xA700, 0xC000]  # cine: out of resources (retry); SEG: cannot understand (park)
        first = Archiver(spool, node, policy=policy).send_due()
        assert (first.stored, first.retry, first.parked) == (0, 1, 1)
        parked = spool.jobs("parked")
        assert [j.sop_instance_uid for j in parked] == [seg.sop_instance_uid]
        assert "cannot understand" in parked[0].last_error
        assert parked[0].path.exists()  # kept for the user
        assert Archiver(spool, node, policy=policy).drain(10.0)
        assert scp.received == [us.sop_instance_uid]  # same UID on retry, never re-UIDed
        assert spool.unpark() == 1  # user fixed the cause
        assert Archiver(spool, node, policy=policy).send_due().stored == 1
        assert spool.counts() == {"done": 2}
    assert scp.received == [us.sop_instance_uid, seg.sop_instance_uid]
