"""Patient and study identity for archived objects: from the Modality Worklist, or typed and validated.

Nothing in this module logs a patient attribute: the ``repr`` of :class:`PatientStudy` hides every
identifying field, and errors name the field that is wrong, never its value.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from dataclasses import dataclass, field

from pydicom.uid import generate_uid

#: UID root used for every UID we create (``2.25.<uuid>`` form; no registered org root needed).
UID_PREFIX: str | None = None  # None -> pydicom's 2.25.<uuid4 as int> form

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_SEX = ("", "M", "F", "O")
# PS3.5 6.2: LO/SH/CS forbid backslash (value separator) and control characters.
_BAD_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")


class StudyValidationError(ValueError):
    """A typed patient/study field is invalid. The message names the field, never its value."""


def new_uid() -> str:
    """A fresh UID (``2.25.<128-bit>``)."""
    return str(generate_uid(prefix=UID_PREFIX))


@dataclass(frozen=True, slots=True)
class PatientStudy:
    """Who and which study an archived object belongs to.

    Identifying fields are excluded from ``repr`` so that a stray log line cannot leak them.

    Attributes:
        patient_name: DICOM PN, ``Family^Given^Middle^Prefix^Suffix``.
        patient_id: the hospital's patient ID (LO, <= 64 chars).
        birth_date: ``YYYYMMDD`` or empty.
        sex: ``M``, ``F``, ``O`` or empty.
        study_instance_uid: from the worklist; empty -> a new one is created (see :meth:`resolved`).
        accession_number: from the worklist (SH, <= 16 chars) or empty.
        study_id: SH (<= 16 chars) or empty.
        study_description: LO or empty.
        referring_physician: PN or empty.
        requested_procedure_id / scheduled_step_id: from the worklist, for the request attributes.
        study_date / study_time: ``YYYYMMDD`` / ``HHMMSS``; empty -> the time of the export.
        source: ``"worklist"`` or ``"manual"`` (not identifying).
    """

    patient_name: str = field(repr=False)
    patient_id: str = field(repr=False)
    birth_date: str = field(default="", repr=False)
    sex: str = field(default="", repr=False)
    study_instance_uid: str = ""
    accession_number: str = field(default="", repr=False)
    study_id: str = field(default="", repr=False)
    study_description: str = field(default="", repr=False)
    referring_physician: str = field(default="", repr=False)
    requested_procedure_id: str = field(default="", repr=False)
    scheduled_step_id: str = field(default="", repr=False)
    study_date: str = ""
    study_time: str = ""
    source: str = "manual"

    def validated(self) -> PatientStudy:
        """Return ``self`` after checking every field against its DICOM VR; raise StudyValidationError."""
        _check_pn("patient_name", self.patient_name, required=True)
        _check_text("patient_id", self.patient_id, 64, required=True)
        if self.birth_date:
            _check_date("birth_date", self.birth_date)
        if self.sex not in _SEX:
            raise StudyValidationError("sex must be M, F, O or empty")
        if self.study_instance_uid and (
            len(self.study_instance_uid) > 64 or not _UID_RE.match(self.study_instance_uid)
        ):
            raise StudyValidationError("study_instance_uid is not a valid DICOM UID")
        _check_text("accession_number", self.accession_number, 16)
        _check_text("study_id", self.study_id, 16)
        _check_text("study_description", self.study_description, 64)
        _check_pn("referring_physician", self.referring_physician, required=False)
        _check_text("requested_procedure_id", self.requested_procedure_id, 16)
        _check_text("scheduled_step_id", self.scheduled_step_id, 16)
        if self.study_date:
            _check_date("study_date", self.study_date)
        if self.study_time and not _TIME_RE.match(self.study_time):
            raise StudyValidationError("study_time must be HHMMSS")
        return self

    def resolved(self, now: _dt.datetime | None = None) -> PatientStudy:
        """Validated copy with a Study Instance UID and study date/time filled in (stable afterwards)."""
        self.validated()
        now = now or _dt.datetime.now()
        return dataclasses.replace(
            self,
            study_instance_uid=self.study_instance_uid or new_uid(),
            study_date=self.study_date or now.strftime("%Y%m%d"),
            study_time=self.study_time or now.strftime("%H%M%S"),
        )


def manual_entry(
    patient_name: str,
    patient_id: str,
    *,
    birth_date: str = "",
    sex: str = "",
    accession_number: str = "",
    study_description: str = "",
    referring_physician: str = "",
) -> PatientStudy:
    """Typed fallback when no worklist is available. Names typed as ``Family, Given`` become ``Family^Given``.

    Raises:
        StudyValidationError: naming the first invalid field.
    """
    name = patient_name.strip()
    if "^" not in name and "," in name:
        family, given = (p.strip() for p in name.split(",", 1))
        name = f"{family}^{given}"
    return PatientStudy(
        patient_name=name,
        patient_id=patient_id.strip(),
        birth_date=birth_date.strip().replace("-", ""),
        sex=sex.strip().upper(),
        accession_number=accession_number.strip(),
        study_description=study_description.strip(),
        referring_physician=referring_physician.strip(),
        source="manual",
    ).validated()


def _check_text(name: str, value: str, max_len: int, *, required: bool = False) -> None:
    if required and not value.strip():
        raise StudyValidationError(f"{name} is required")
    if len(value) > max_len:
        raise StudyValidationError(f"{name} is longer than {max_len} characters")
    if _BAD_CHARS.search(value):
        raise StudyValidationError(f"{name} contains a backslash or control character")


def _check_pn(name: str, value: str, *, required: bool) -> None:
    if required and not value.replace("^", "").strip():
        raise StudyValidationError(f"{name} is required")
    if value.count("^") > 4:
        raise StudyValidationError(f"{name} has more than 5 components")
    if any(len(c) > 64 for c in value.split("^")):
        raise StudyValidationError(f"{name} has a component longer than 64 characters")
    if _BAD_CHARS.search(value) or "=" in value:
        raise StudyValidationError(f"{name} contains a backslash, '=' or control character")


def _check_date(name: str, value: str) -> None:
    if not _DATE_RE.match(value):
        raise StudyValidationError(f"{name} must be YYYYMMDD")
    try:
        d = _dt.datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise StudyValidationError(f"{name} is not a real calendar date") from None
    if d > _dt.date.today():
        raise StudyValidationError(f"{name} is in the future")
