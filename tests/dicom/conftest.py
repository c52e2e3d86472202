"""Real DICOM peers for the archive tests: Orthanc (PACS + Modality Worklist plugin) and dcmtk storescp.

Each is started on free loopback ports with a temporary configuration and stopped afterwards. Tests that
need a binary skip with a reason when it is missing; in CI (.ci/run) they are installed.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from guidance.dicom.study import PatientStudy, manual_entry

ORTHANC = shutil.which("Orthanc")
STORESCP = shutil.which("storescp")
DCIODVFY = shutil.which("dciodvfy")
WORKLIST_PLUGIN = next(
    (
        p
        for p in (
            Path("/usr/share/orthanc/plugins/libModalityWorklists.so"),
            Path("/usr/lib/orthanc/libModalityWorklists.so"),
        )
        if p.exists()
    ),
    None,
)
OUR_AET = "GUIDANCE_TEST"
PACS_AET = "ORTHANC_TEST"

needs_orthanc = pytest.mark.skipif(
    ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)"
)
needs_storescp = pytest.mark.skipif(
    STORESCP is None, reason="dcmtk storescp is not installed (apt-get install dcmtk)"
)
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy is not installed (apt-get install dicom3tools)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY is not None
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@dataclass
class OrthancServer:
    """A running Orthanc; ``restart()`` keeps its storage (to simulate a PACS coming back)."""

    workdir: Path
    dicom_port: int
    http_port: int
    worklist_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "guidance-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": PACS_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"guidance": [OUR_AET, "127.0.0.1", 11112]},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "StorageCompression": False,
            "StoreMD5ForAttachments": False,
            "SyncStorageArea": False,
            "MaximumPduLength": 131072,
            "SaveJobs": False,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
            "Plugins": [],
        }
        if WORKLIST_PLUGIN is not None:
            cfg["Plugins"] = [str(WORKLIST_PLUGIN)]
            cfg["Worklists"] = {"Enable": True, "Database": str(self.worklist_dir)}
        return cfg

    def start(self) -> None:
        assert ORTHANC is not None
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config()))
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([ORTHANC, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start within 30 s")

    def kill(self) -> None:
        """SIGKILL (a crashed PACS)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            return json.loads(rsp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as rsp:
            data: bytes = rsp.read()
        return data

    def get_text(self, path: str) -> str:
        return self.get_bytes(path).decode()

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return json.loads(rsp.read())

    def instance_uids(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs stored for a study (one entry per stored instance)."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        )
        return [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in found]

    def add_worklist(self, name: str, ds: Dataset) -> Path:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.31")
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = self.worklist_dir / f"{name}.wl"
        ds.save_as(path, enforce_file_format=True)
        return path


def _start_orthanc(root: Path) -> OrthancServer:
    wl = root / "worklists"
    wl.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(root, free_port(), free_port(), wl)
    server.start()
    return server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc per test module (tests use their own study UIDs, so they do not see each other)."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    server = _start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def private_orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """An Orthanc of this test alone (the test may kill and restart it)."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    server = _start_orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@dataclass
class StoreSCP:
    port: int
    aet: str
    out_dir: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


def _run_storescp(tmp_path: Path, name: str, extra: list[str]) -> Iterator[StoreSCP]:
    if STORESCP is None:
        pytest.skip("dcmtk storescp is not installed (apt-get install dcmtk)")
    out = tmp_path / name
    out.mkdir()
    port = free_port()
    # --unique-filenames: a duplicate C-STORE of the same instance shows up as a second file
    proc = subprocess.Popen(
        [
            STORESCP,
            "--aetitle",
            "STORESCP",
            "--output-directory",
            str(out),
            "--unique-filenames",
            *extra,
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("storescp did not start") from None
            time.sleep(0.05)
    yield StoreSCP(port, "STORESCP", out, proc)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    yield from _run_storescp(tmp_path, "storescp", [])


# dcmtk association negotiation profile: image SOP classes only in RLE Lossless, SEG uncompressed.
_RLE_ONLY_PROFILE = r"""
[[TransferSyntaxes]]
[RleOnly]
TransferSyntax1 = RLELossless
[Plain]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[RleImages]
PresentationContext1 = VerificationSOPClass\Plain
PresentationContext2 = UltrasoundMultiframeImageStorage\RleOnly
PresentationContext3 = MultiframeGrayscaleByteSecondaryCaptureImageStorage\RleOnly
PresentationContext4 = MultiframeGrayscaleWordSecondaryCaptureImageStorage\RleOnly
PresentationContext5 = MultiframeTrueColorSecondaryCaptureImageStorage\RleOnly
PresentationContext6 = SegmentationStorage\Plain

[[Profiles]]
[RleImages]
PresentationContexts = RleImages
"""


@pytest.fixture
def storescp_rle_only(tmp_path: Path) -> Iterator[StoreSCP]:
    """storescp accepting the image SOP classes only in RLE Lossless (SEG uncompressed)."""
    cfg = tmp_path / "rle-only.cfg"
    cfg.write_text(_RLE_ONLY_PROFILE)
    yield from _run_storescp(tmp_path, "storescp-rle", ["--config-file", str(cfg), "RleImages"])


# ------------------------------------------------------------------------------------------- TLS
OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Certs:
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    other_crt: Path  # a certificate that signed nothing here


def _self_signed(folder: Path, name: str, cn: str) -> tuple[Path, Path]:
    assert OPENSSL is not None
    crt, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-addext",
            f"subjectAltName=DNS:{cn},IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return crt, key


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    s_crt, s_key = _self_signed(d, "server", "localhost")
    c_crt, c_key = _self_signed(d, "client", "guidance-test")
    o_crt, _ = _self_signed(d, "other", "localhost")
    return Certs(s_crt, s_key, c_crt, c_key, o_crt)


@pytest.fixture
def tls_storescp(tmp_path: Path, tls_certs: Certs) -> Iterator[StoreSCP]:
    """storescp with TLS, its self-signed certificate, and our client certificate required."""
    yield from _run_storescp(
        tmp_path,
        "storescp-tls",
        [
            "+tls",
            str(tls_certs.server_key),
            str(tls_certs.server_crt),
            "-pw",  # the key has no password
            "+cf",
            str(tls_certs.client_crt),
            "-rc",  # require (and verify) the caller's certificate
        ],
    )


# ------------------------------------------------------------------------------------------ data
@pytest.fixture
def study() -> PatientStudy:
    return manual_entry(
        "Test^Patient", "TEST-001", birth_date="19700101", sex="O", accession_number="ACC001"
    ).resolved()


@pytest.fixture
def cine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """12 frames 48x64 uint8, per-frame times (s) at ~30 fps with jitter, label maps with both classes."""
    rng = np.random.default_rng(7)
    n, rows, cols = 12, 48, 64
    images = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    times = np.arange(n) / 30.0 + rng.uniform(0, 0.004, n)
    masks = np.zeros((n, rows, cols), np.uint8)
    for i in range(n):
        masks[i, 5 + i : 9 + i, 10:40] = 1
        masks[i, 30:40, 45:55] = 2
    masks[3] = 0  # an empty frame
    return images, times, masks


def worklist_item(study_uid: str, *, modality: str, station: str, date: str, pid: str, name: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = "19800202"
    ds.PatientSex = "F"
    ds.AccessionNumber = f"A{pid}"[:16]
    ds.StudyInstanceUID = study_uid
    ds.RequestedProcedureID = "RP1"
    ds.RequestedProcedureDescription = "Liver biopsy"
    ds.ReferringPhysicianName = "Ref^Doc"
    sps = Dataset()
    sps.Modality = modality
    sps.ScheduledStationAETitle = station
    sps.ScheduledProcedureStepStartDate = date
    sps.ScheduledProcedureStepStartTime = "090000"
    sps.ScheduledProcedureStepID = "SPS1"
    sps.ScheduledProcedureStepDescription = "Biopsy"
    ds.ScheduledProcedureStepSequence = DicomSequence([sps])
    return ds


def today() -> str:
    return _dt.date.today().strftime("%Y%m%d")


@pytest.fixture
def dciodvfy() -> Any:
    """``dciodvfy(path) -> list of Error lines``; skips when dicom3tools is missing."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    return dciodvfy_errors


@pytest.fixture
def make_worklist_item() -> Any:
    return worklist_item


@pytest.fixture
def our_aet() -> str:
    return OUR_AET


@pytest.fixture
def pacs_aet() -> str:
    return PACS_AET
