"""DICOM network: C-ECHO "test connection", C-STORE of files from disk, Modality Worklist C-FIND.

Failures are turned into plain-language reasons (connection refused, AE title not recognised...). C-STORE
proposes only the presentation contexts the objects need: for each SOP class one context per transfer
syntax - Explicit VR Little Endian (the spooled files' own), the lossless compressed syntaxes we can write
for it (RLE Lossless; JPEG-LS Lossless when pyjpegls is installed; none for 1-bit Segmentation) and
Implicit VR Little Endian. Files are sent chunked from disk (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``);
when the peer did not accept the file's own syntax, a streamed copy in an accepted one is written first
(:mod:`guidance.dicom.transcode`), same SOP Instance UID, never lossy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import socket
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from guidance.dicom.study import PatientStudy
from guidance.dicom.transcode import (
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    TRANSFER_SYNTAX_NAMES,
    UNCOMPRESSED,
    lossless_syntaxes,
    proposed_syntaxes,
    transcode_file,
)
from guidance.dicom.writers import SOP_CLASS_NAMES

logger = logging.getLogger(__name__)

# Send C-STORE data sets straight from the file in PDV-sized chunks instead of decoding them into memory.
_config.STORE_SEND_CHUNKED_DATASET = True

Verification = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO)
ModalityWorklistInformationFind = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND

_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "the application context is not supported",
    (
        1,
        3,
    ): "the PACS does not recognise our AE title (calling AE {calling!r}); ask its administrator to add it",
    (1, 7): "the PACS does not answer to AE title {called!r} (called AE); check the AE title in the settings",
    (2, 1): "no reason given",
    (2, 2): "the protocol version is not supported",
    (3, 1): "the PACS is congested (temporary)",
    (3, 2): "the PACS reached a local limit, e.g. too many connections (temporary)",
}


class DicomNetworkError(Exception):
    """A network operation failed; ``reason`` is plain words, ``transient`` says whether a retry may help."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True, slots=True, eq=False)
class DicomNode:
    """A remote DICOM application entity and how to reach it.

    Attributes:
        host, port: where the peer listens.
        called_aet: the peer's AE title.
        calling_aet: ours (must be configured on the peer when it checks callers).
        connect_timeout_s: TCP connect; acse_timeout_s: association negotiation; dimse_timeout_s: waiting
            for a response (C-STORE of a large object counts from the end of sending);
            network_timeout_s: idle network.
        tls: an ``ssl.SSLContext`` for DICOM TLS (PS3.15 B.1), or None for plain TCP.
        tls_server_hostname: host name to verify on the peer's certificate.
        prefer_compression: send a lossless compressed copy whenever the peer accepts one (saves network
            and archive space; costs CPU here), instead of only when it accepts nothing uncompressed.
    """

    host: str
    port: int
    called_aet: str
    calling_aet: str = "GUIDANCE"
    connect_timeout_s: float = 5.0
    acse_timeout_s: float = 15.0
    dimse_timeout_s: float = 120.0
    network_timeout_s: float = 60.0
    tls: ssl.SSLContext | None = None
    tls_server_hostname: str | None = None
    prefer_compression: bool = False

    def label(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    def make_ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.connection_timeout = self.connect_timeout_s
        ae.acse_timeout = self.acse_timeout_s
        ae.dimse_timeout = self.dimse_timeout_s
        ae.network_timeout = self.network_timeout_s
        return ae


def make_tls_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A client context for DICOM TLS (PS3.15 B.1 / BCP 195: TLS 1.2 or newer, peer verified).

    ``ca_file``: the certificate(s) that sign the PACS's certificate (a self-signed PACS: its own
    certificate). ``cert_file``/``key_file``: our certificate, for PACS that authenticate their callers.

    Raises:
        OSError / ssl.SSLError: a file is missing or not a certificate/key.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file is not None else None)
    return ctx


@dataclass(frozen=True, slots=True)
class EchoResult:
    ok: bool
    message: str  # plain words, shown to the user


def _check_reachable(node: DicomNode) -> None:
    """Open and close a TCP connection (with the TLS handshake when TLS is on) to give a precise reason
    before DICOM negotiation."""
    try:
        with socket.create_connection((node.host, node.port), timeout=node.connect_timeout_s) as sock:
            if node.tls is not None:
                _check_tls(node, node.tls, sock)
    except ConnectionRefusedError:
        raise DicomNetworkError(
            f"nothing is listening at {node.host}:{node.port} (connection refused); "
            "is the PACS running and the port right?",
            transient=True,
        ) from None
    except TimeoutError:
        raise DicomNetworkError(
            f"no answer from {node.host}:{node.port} within {node.connect_timeout_s:g} s "
            "(firewall, wrong host?)",
            transient=True,
        ) from None
    except socket.gaierror:
        raise DicomNetworkError(f"unknown host name {node.host!r}", transient=True) from None
    except OSError as exc:
        raise DicomNetworkError(
            f"cannot connect to {node.host}:{node.port}: {exc.strerror or exc}", transient=True
        ) from None


def _check_tls(node: DicomNode, ctx: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        # wrap_socket on a connected socket runs the handshake (the peer's certificate is checked) now
        ctx.wrap_socket(sock, server_hostname=node.tls_server_hostname or node.host).close()
    except ssl.SSLCertVerificationError as exc:
        raise DicomNetworkError(
            f"the TLS certificate of {node.host}:{node.port} is not trusted ({exc.verify_message}); "
            "check the CA certificate and the host name in the settings",
            transient=False,
        ) from None
    except ssl.SSLError as exc:
        raise DicomNetworkError(
            f"TLS with {node.host}:{node.port} failed ({exc.reason or exc}); does the PACS expect TLS, "
            "and our certificate?",
            transient=False,
        ) from None


def _close_transport(assoc: Association) -> None:
    """Close the socket of an association that failed to establish (pynetdicom can leave it open when
    the peer dropped the connection during a TLS or association handshake)."""
    transport = assoc.dul.socket
    raw = transport.socket if transport is not None else None
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.close()


def _association_answer(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE answer (accept or reject), or None if it sent none.

    pynetdicom 3.0 has a race: its DUL thread can receive an A-ASSOCIATE-RJ and close the socket
    before the requesting thread checks that the socket is connected; the requesting thread then
    aborts and the rejection is left unread on the DUL's queue. Seen in CI (a loaded 2-core machine)
    and here in 55 of 300 echoes under CPU load: the user was told "aborted" where the PACS had said
    exactly what was wrong. So look on that queue too.
    """
    answer: object = assoc.acceptor.primitive  # typed as always set, but None until an answer is read
    if answer is None:
        answer = assoc.dul.peek_next_pdu()
    return answer if isinstance(answer, A_ASSOCIATE) else None


def _associate(node: DicomNode, ae: AE) -> Association:
    """Associate with ``node`` or raise DicomNetworkError with the reason in plain words."""
    _check_reachable(node)
    tls_args = (node.tls, node.tls_server_hostname or node.host) if node.tls is not None else None
    assoc = ae.associate(node.host, node.port, ae_title=node.called_aet, tls_args=tls_args)
    if assoc.is_established:
        return assoc
    _close_transport(assoc)
    rsp = _association_answer(assoc)
    if rsp is not None and rsp.result in (1, 2):
        result, source, diag = int(rsp.result or 0), int(rsp.result_source or 0), int(rsp.diagnostic or 0)
        why = _REJECT_REASONS.get((source, diag), f"reason code {source}/{diag}").format(
            calling=node.calling_aet, called=node.called_aet
        )
        permanent = result == 1
        raise DicomNetworkError(
            f"{node.label()} rejected the association {'(permanent)' if permanent else '(transient)'}: {why}",
            transient=not permanent,
        )
    if assoc.is_aborted:
        raise DicomNetworkError(
            f"{node.label()} aborted the association "
            "(it accepted none of the proposed services, or closed the connection)",
            transient=True,
        )
    raise DicomNetworkError(f"{node.label()} did not answer the association request in time", transient=True)


def echo(node: DicomNode) -> EchoResult:
    """C-ECHO the node: the "test connection" button. Never raises for network problems."""
    ae = node.make_ae()
    ae.add_requested_context(Verification)
    try:
        assoc = _associate(node, ae)
    except DicomNetworkError as exc:
        ae.shutdown()
        return EchoResult(False, exc.reason)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
        ae.shutdown()
    if "Status" not in status:
        return EchoResult(False, f"{node.label()} did not answer the echo (timeout or connection lost)")
    if int(status.Status) != 0:
        return EchoResult(
            False, f"{node.label()} answered the echo with failure status 0x{int(status.Status):04X}"
        )
    return EchoResult(True, f"{node.label()} answered (DICOM echo OK)")


# ------------------------------------------------------------------------------------------- C-STORE
@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What became of one C-STORE. ``category``: success | warning | transient | permanent."""

    category: str
    status: int | None
    message: str
    transfer_syntax: str = ""  # the syntax the object was sent in (when it was sent)

    @property
    def stored(self) -> bool:
        return self.category in ("success", "warning")


_WARNING_STATUSES = {0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


def classify_status(status: int) -> StoreOutcome:
    """Map a C-STORE response status (PS3.4 B.2.3, PS3.7 C) to retry policy."""
    if status == 0x0000:
        return StoreOutcome("success", status, "stored")
    if status in _WARNING_STATUSES:
        return StoreOutcome("warning", status, f"stored with warning 0x{status:04X}")
    if 0xA700 <= status <= 0xA7FF or status in (0x0110, 0x0213):
        return StoreOutcome("transient", status, f"PACS out of resources or busy (0x{status:04X})")
    if 0xA900 <= status <= 0xA9FF:
        return StoreOutcome(
            "permanent", status, f"PACS says the object does not match its SOP class (0x{status:04X})"
        )
    if 0xC000 <= status <= 0xCFFF:
        return StoreOutcome("permanent", status, f"PACS cannot understand the object (0x{status:04X})")
    if status == 0x0122:
        return StoreOutcome("permanent", status, "PACS does not support this SOP class (0x0122)")
    if status == 0x0124:
        return StoreOutcome("permanent", status, "PACS refuses: not authorised (0x0124)")
    return StoreOutcome("permanent", status, f"PACS failure status 0x{status:04X}")


_SHORT_TS = {RLE_LOSSLESS: "rle", JPEG_LS_LOSSLESS: "jls", str(ImplicitVRLittleEndian): "ivrle"}


def choose_syntax(
    file_ts: str, sop_class: str, accepted: Iterable[str], *, prefer_compression: bool = False
) -> str | None:
    """Which transfer syntax to send a file in, given what the peer accepted for its SOP class.

    The file's own syntax first (sent as is, chunked from disk); then Implicit VR Little Endian (a
    streamed re-encoding of the header, pixels copied); then a lossless compressed syntax (streamed frame
    by frame). With ``prefer_compression`` an accepted lossless compressed syntax comes first. Never
    lossy. None when the peer accepted nothing we can write.
    """
    ok = set(accepted)
    if prefer_compression and file_ts in UNCOMPRESSED:
        for ts in lossless_syntaxes(sop_class):
            if ts in ok:
                return ts
    if file_ts in ok:
        return file_ts
    if file_ts not in UNCOMPRESSED:
        return None
    for ts in (str(ImplicitVRLittleEndian), *lossless_syntaxes(sop_class)):
        if ts in ok:
            return ts
    return None


class StoreSession:
    """One association for storing a batch of files (context manager).

    ``sop_classes`` decides the presentation contexts; :meth:`store` sends one file.
    """

    def __init__(self, node: DicomNode, sop_classes: Iterable[str]) -> None:
        self._node = node
        self._classes = sorted(set(sop_classes))
        self._ae: AE | None = None
        self._assoc: Association | None = None

    def __enter__(self) -> StoreSession:
        self.open()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        ae = self._node.make_ae()
        for uid in self._classes:
            for ts in proposed_syntaxes(uid):  # one context per syntax: the peer accepts each on its own
                ae.add_requested_context(uid, [ts])
        self._ae = ae
        try:
            self._assoc = _associate(self._node, ae)
        except BaseException:
            ae.shutdown()
            self._ae = None
            raise

    def close(self) -> None:
        if self._assoc is not None:
            if self._assoc.is_established:
                self._assoc.release()
            self._assoc = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def abort(self) -> None:
        """Abort from another thread (stop button / shutdown); the send in progress fails as transient."""
        assoc = self._assoc
        if assoc is not None and assoc.is_established:
            assoc.abort()

    @property
    def alive(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    def accepted_syntaxes(self, sop_class: str) -> list[str]:
        if self._assoc is None:
            return []
        return [
            str(cx.transfer_syntax[0])
            for cx in self._assoc.accepted_contexts
            if cx.abstract_syntax == sop_class
        ]

    def store(self, path: Path, message_id: int = 1) -> StoreOutcome:
        """C-STORE one file. Raises DicomNetworkError when the association is gone (transient)."""
        if self._assoc is None or not self._assoc.is_established:
            raise DicomNetworkError(f"association with {self._node.label()} is closed", transient=True)
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        file_ts = str(meta.TransferSyntaxUID)
        accepted = self.accepted_syntaxes(sop_class)
        name = SOP_CLASS_NAMES.get(sop_class, sop_class)
        if not accepted:
            return StoreOutcome("permanent", None, f"{self._node.label()} does not accept {name}")
        target = choose_syntax(file_ts, sop_class, accepted, prefer_compression=self._node.prefer_compression)
        if target is None:
            return StoreOutcome(
                "permanent",
                None,
                f"{self._node.label()} accepts {name} only in transfer syntaxes we cannot write: "
                + ", ".join(TRANSFER_SYNTAX_NAMES.get(t, t) for t in accepted),
            )
        send = path
        if target != file_ts:
            # A copy in the accepted syntax, written beside the spooled file under a dot name (the spool
            # deletes dot files after a crash). It is kept if the send fails for a transient reason, so a
            # retry does not transcode again, and deleted once the peer answered.
            send = path.with_name(f".{path.name}.{_SHORT_TS.get(target, 'ts')}")
            if not send.exists():
                try:
                    transcode_file(path, send, target)
                except ValueError as exc:
                    return StoreOutcome("permanent", None, f"cannot write a copy the PACS accepts: {exc}")
                except OSError as exc:  # e.g. no room for the copy: try again later
                    return StoreOutcome(
                        "transient", None, f"cannot write a copy the PACS accepts: {exc.strerror or exc}"
                    )
        rsp = self._assoc.send_c_store(send, msg_id=message_id)  # chunked from disk
        if "Status" not in rsp:
            raise DicomNetworkError(
                f"{self._node.label()} did not acknowledge the object (timeout or connection lost)",
                transient=True,
            )
        if send != path:
            send.unlink(missing_ok=True)
        outcome = classify_status(int(rsp.Status))
        return dataclasses.replace(outcome, transfer_syntax=target)


# --------------------------------------------------------------------------------- Modality Worklist
@dataclass(frozen=True, slots=True)
class WorklistQuery:
    """C-FIND filter. Empty fields match everything. ``date`` is ``YYYYMMDD`` or a range ``A-B``."""

    modality: str = ""
    station_aet: str = ""
    date: str = ""
    patient_id: str = ""


def today() -> str:
    return _dt.date.today().strftime("%Y%m%d")


def find_worklist(node: DicomNode, query: WorklistQuery) -> list[PatientStudy]:
    """Query the Modality Worklist (C-FIND, MWL Information Model - FIND). Items come back as PatientStudy.

    Raises:
        DicomNetworkError: when the worklist cannot be reached or the query fails.
    """
    ae = node.make_ae()
    ae.add_requested_context(ModalityWorklistInformationFind)
    identifier = _mwl_identifier(query)
    try:
        assoc = _associate(node, ae)
    except DicomNetworkError:
        ae.shutdown()
        raise
    items: list[PatientStudy] = []
    try:
        for status, ds in _iter_find(assoc, identifier):
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and ds is not None:
                items.append(_to_patient_study(ds))
            elif code != 0x0000:
                raise DicomNetworkError(
                    f"worklist query failed with status 0x{code:04X}", transient=code == 0xA700
                )
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    logger.info("Worklist: %d item(s)", len(items))
    return items


def _iter_find(assoc: Association, identifier: Dataset) -> Iterator[tuple[Dataset, Dataset | None]]:
    for status, ds in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
        if "Status" not in status:
            raise DicomNetworkError(
                "the worklist did not answer (timeout or connection lost)", transient=True
            )
        yield status, ds


def _mwl_identifier(q: WorklistQuery) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for kw in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyInstanceUID",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "ReferringPhysicianName",
    ):
        setattr(ds, kw, "")
    ds.PatientID = q.patient_id
    sps = Dataset()
    sps.Modality = q.modality
    sps.ScheduledStationAETitle = q.station_aet
    sps.ScheduledProcedureStepStartDate = q.date
    sps.ScheduledProcedureStepStartTime = ""
    sps.ScheduledProcedureStepID = ""
    sps.ScheduledProcedureStepDescription = ""
    ds.ScheduledProcedureStepSequence = DicomSequence([sps])
    return ds


def _s(ds: Dataset, kw: str) -> str:
    v = ds.get(kw, "")
    return "" if v is None else str(v)


def _to_patient_study(ds: Dataset) -> PatientStudy:
    sps = ds.ScheduledProcedureStepSequence[0] if ds.get("ScheduledProcedureStepSequence") else Dataset()
    return PatientStudy(
        patient_name=_s(ds, "PatientName"),
        patient_id=_s(ds, "PatientID"),
        birth_date=_s(ds, "PatientBirthDate"),
        sex=_s(ds, "PatientSex"),
        study_instance_uid=_s(ds, "StudyInstanceUID"),
        accession_number=_s(ds, "AccessionNumber"),
        study_description=_s(ds, "RequestedProcedureDescription")[:64],
        referring_physician=_s(ds, "ReferringPhysicianName"),
        requested_procedure_id=_s(ds, "RequestedProcedureID"),
        scheduled_step_id=_s(sps, "ScheduledProcedureStepID"),
        study_date="",
        study_time="",
        source="worklist",
    )
