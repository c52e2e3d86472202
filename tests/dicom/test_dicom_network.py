"""Against real peers (Orthanc + worklist plugin, dcmtk storescp): echo, worklist, store, spool faults."""

from __future__ import annotations

import datetime as _dt
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guidance.dicom.export import ExportOptions, archive, spool_objects
from guidance.dicom.network import DicomNode, WorklistQuery, echo, find_worklist
from guidance.dicom.spool import Archiver, RetryPolicy, SendEvent, Spool, SpoolFullError
from guidance.dicom.study import PatientStudy, new_uid

pytestmark = pytest.mark.dicom
Cine = tuple[np.ndarray, np.ndarray, np.ndarray]
FAST_RETRY = RetryPolicy(initial_s=0.05, max_s=0.2, max_attempts=50)
REPO = Path(__file__).resolve().parents[2]


def _node(server: Any, our_aet: str, pacs_aet: str, **kw: Any) -> DicomNode:
    return DicomNode("127.0.0.1", server.dicom_port, pacs_aet, our_aet, **kw)


def _uids(objs: list[Any]) -> set[str]:
    return {o.sop_instance_uid for o in objs}


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ echo
def test_dicom_echo_ok(orthanc: Any, our_aet: str, pacs_aet: str) -> None:
    res = echo(_node(orthanc, our_aet, pacs_aet))
    assert res.ok, res.message


def test_dicom_echo_wrong_called_aet_says_why(orthanc: Any, our_aet: str) -> None:
    res = echo(_node(orthanc, our_aet, "NOT_THE_PACS"))
    assert not res.ok
    assert "does not answer to AE title 'NOT_THE_PACS'" in res.message
    assert "permanent" in res.message


def test_dicom_echo_refused_says_why(closed_port: int, our_aet: str) -> None:
    res = echo(DicomNode("127.0.0.1", closed_port, "PACS", our_aet))
    assert not res.ok
    assert "connection refused" in res.message


# ------------------------------------------------------------------------------------ worklist
def test_dicom_worklist_find_filters_and_maps(
    orthanc: Any, our_aet: str, pacs_aet: str, make_worklist_item: Any
) -> None:
    today = _dt.date.today().strftime("%Y%m%d")
    uid_us, uid_xa = new_uid(), new_uid()
    orthanc.add_worklist(
        "us",
        make_worklist_item(uid_us, modality="US", station="US_ROOM1", date=today, pid="WL1", name="Wl^One"),
    )
    orthanc.add_worklist(
        "xa", make_worklist_item(uid_xa, modality="XA", station="ANGIO", date=today, pid="WL2", name="Wl^Two")
    )
    orthanc.add_worklist(
        "old",
        make_worklist_item(
            new_uid(), modality="US", station="US_ROOM1", date="20000101", pid="WL3", name="O"
        ),
    )
    node = _node(orthanc, our_aet, pacs_aet)
    items = find_worklist(node, WorklistQuery(modality="US", date=today))
    assert [i.patient_id for i in items] == ["WL1"]
    st = items[0]
    assert (st.patient_name, st.study_instance_uid, st.accession_number) == ("Wl^One", uid_us, "AWL1")
    assert st.source == "worklist"
    st.validated()
    by_station = find_worklist(node, WorklistQuery(station_aet="ANGIO"))
    assert [i.study_instance_uid for i in by_station] == [uid_xa]
    assert len(find_worklist(node, WorklistQuery(modality="US"))) == 2


# -------------------------------------------------------------------------------------- archive
def test_dicom_archive_reaches_orthanc_exactly(  # noqa: PLR0917 - fixtures
    orthanc: Any, our_aet: str, pacs_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    events: list[SendEvent] = []
    res = archive(
        images,
        _node(orthanc, our_aet, pacs_aet),
        tmp_path / "spool",
        study,
        masks=masks,
        options=ExportOptions(times_s=times, spacing_mm=(0.2, 0.2)),
        on_event=events.append,
    )
    assert res.report.stored == 2
    assert (res.pending, res.parked) == (0, 0)
    assert sorted(orthanc.instance_uids(study.study_instance_uid)) == sorted(_uids(res.objects))
    assert [e.kind for e in events] == ["sending", "stored", "sending", "stored"]
    assert not list((tmp_path / "spool" / "objects").iterdir())  # local copies deleted after success


def test_dicom_storescp_gets_each_instance_once(
    storescp: Any, our_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    node = DicomNode("127.0.0.1", storescp.port, storescp.aet, our_aet)
    res = archive(images, node, tmp_path / "spool", study, masks=masks, options=ExportOptions(times_s=times))
    assert res.report.stored == 2
    import pydicom

    got = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.files()]
    assert sorted(got) == sorted(_uids(res.objects))


def test_dicom_wrong_called_aet_keeps_objects_and_says_why(
    orthanc: Any, our_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, _ = cine
    res = archive(
        images,
        _node(orthanc, our_aet, "WRONG_AET"),
        tmp_path / "spool",
        study,
        options=ExportOptions(times_s=times),
        policy=FAST_RETRY,
    )
    assert "does not answer to AE title 'WRONG_AET'" in res.report.error
    assert res.pending == 1
    with Spool(tmp_path / "spool") as spool:  # fixed settings: the same object goes through
        spool.retry_now()
        assert Archiver(spool, _node(orthanc, our_aet, "ORTHANC_TEST")).send_due().stored == 1
    assert orthanc.instance_uids(study.study_instance_uid) == [res.objects[0].sop_instance_uid]


def test_dicom_rejection_read_even_when_the_socket_closes_first(
    orthanc: Any, our_aet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's requesting thread can find the socket already closed by the DUL thread that read
    the A-ASSOCIATE-RJ (it then aborts and leaves the rejection unread). Hold the requesting thread
    back after it sends the request so that ordering happens every time, against the real Orthanc."""
    import time

    from pynetdicom.acse import ACSE

    send_request = ACSE.send_request

    def send_then_stall(self: ACSE) -> None:
        send_request(self)
        time.sleep(0.5)

    monkeypatch.setattr(ACSE, "send_request", send_then_stall)
    res = echo(_node(orthanc, our_aet, "WRONG_AET"))
    assert not res.ok
    assert "does not answer to AE title 'WRONG_AET'" in res.message


def test_dicom_pacs_down_at_start_then_back(  # noqa: PLR0917 - fixtures
    private_orthanc: Any, our_aet: str, pacs_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    node = _node(private_orthanc, our_aet, pacs_aet)
    private_orthanc.stop()
    res = archive(
        images,
        node,
        tmp_path / "spool",
        study,
        masks=masks,
        options=ExportOptions(times_s=times),
        policy=FAST_RETRY,
    )
    assert "connection refused" in res.report.error
    assert res.pending == 2
    private_orthanc.start()
    with Spool(tmp_path / "spool") as spool:
        assert Archiver(spool, node, policy=FAST_RETRY).drain(20.0)
        assert spool.counts() == {"done": 2}
    assert sorted(private_orthanc.instance_uids(study.study_instance_uid)) == sorted(_uids(res.objects))


def test_dicom_pacs_killed_mid_transfer_then_back(  # noqa: PLR0917 - fixtures
    private_orthanc: Any, our_aet: str, pacs_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    node = _node(private_orthanc, our_aet, pacs_aet)
    opts = ExportOptions(times_s=times, max_instance_bytes=1_000_000 + 3 * images[0].nbytes)  # 4 parts
    killed: list[bool] = []

    def kill_after_first(ev: SendEvent) -> None:
        if ev.kind == "stored" and not killed:
            private_orthanc.kill()  # SIGKILL while the association is open, mid-batch
            killed.append(True)

    with Spool(tmp_path / "spool") as spool:
        objs = spool_objects(images, spool, study, masks=masks, options=opts)
        assert len(objs) == 8
        report = Archiver(spool, node, policy=FAST_RETRY, on_event=kill_after_first).send_due()
        assert report.stored == 1
        assert report.retry == 7
        private_orthanc.start()
        assert Archiver(spool, node, policy=FAST_RETRY).drain(20.0)
        assert spool.counts() == {"done": 8}
    assert sorted(private_orthanc.instance_uids(study.study_instance_uid)) == sorted(_uids(objs))


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from guidance.dicom.network import DicomNode
    from guidance.dicom.spool import Archiver, Spool
    spool_dir, port, called, calling = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sent = []
    def on_event(ev):
        if ev.kind == "sending":
            sent.append(ev)
            if len(sent) == 3:  # killed while the third object is on its way
                os.kill(os.getpid(), signal.SIGKILL)
    with Spool(Path(spool_dir)) as spool:
        Archiver(spool, DicomNode("127.0.0.1", port, called, calling), on_event=on_event).send_due()
    """
)


def test_dicom_app_killed_mid_send_resumes(  # noqa: PLR0917 - fixtures
    orthanc: Any, our_aet: str, pacs_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    opts = ExportOptions(times_s=times, max_instance_bytes=1_000_000 + 4 * images[0].nbytes)  # 3 parts
    spool_dir = tmp_path / "spool"
    with Spool(spool_dir) as spool:
        objs = spool_objects(images, spool, study, masks=masks, options=opts)
    assert len(objs) == 6
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(spool_dir), str(orthanc.dicom_port), pacs_aet, our_aet],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(orthanc.instance_uids(study.study_instance_uid)) == 2
    with Spool(spool_dir) as spool:  # restart: the interrupted job is pending again, nothing lost
        assert spool.counts() == {"done": 2, "pending": 4}
        assert Archiver(spool, _node(orthanc, our_aet, pacs_aet)).drain(20.0)
        assert spool.counts() == {"done": 6}
    assert sorted(orthanc.instance_uids(study.study_instance_uid)) == sorted(_uids(objs))


def test_dicom_spool_quota_refuses_without_losing(  # noqa: PLR0917 - fixtures
    orthanc: Any, our_aet: str, pacs_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    quota = 150_000  # room for one batch (~120 kB estimated, ~60 kB actual), not two
    spool_dir = tmp_path / "spool"
    with Spool(spool_dir, quota) as spool:
        first = spool_objects(images, spool, study, masks=masks, options=ExportOptions(times_s=times))
        with pytest.raises(SpoolFullError, match="spool is full"):
            spool_objects(images, spool, study, masks=masks, options=ExportOptions(times_s=times))
        assert spool.counts() == {"pending": 2}
        assert all(j.path.exists() for j in spool.jobs())
        assert not [p for p in (spool_dir / "incoming").rglob("*") if p.is_file()]
        assert Archiver(spool, _node(orthanc, our_aet, pacs_aet)).send_due().stored == 2
    assert sorted(orthanc.instance_uids(study.study_instance_uid)) == sorted(_uids(first))


def test_dicom_sender_thread_lifecycle(  # noqa: PLR0917 - fixtures
    orthanc: Any, our_aet: str, pacs_aet: str, tmp_path: Path, study: PatientStudy, cine: Cine
) -> None:
    images, times, masks = cine
    stored: list[SendEvent] = []
    import threading

    done = threading.Event()

    def on_event(ev: SendEvent) -> None:
        if ev.kind == "stored":
            stored.append(ev)
            if len(stored) == 2:
                done.set()

    with Spool(tmp_path / "spool") as spool:
        sender = Archiver(spool, _node(orthanc, our_aet, pacs_aet), on_event=on_event)
        sender.start()
        try:
            spool_objects(images, spool, study, masks=masks, options=ExportOptions(times_s=times))
            sender.wake()
            assert done.wait(30)
        finally:
            sender.stop()
    assert len(orthanc.instance_uids(study.study_instance_uid)) == 2
