"""DICOM archive (issue #6): writers, patient/study, network (echo/store/worklist), spool, export.

Public entry points (import from the submodules; this package does not import them eagerly so that
``import guidance`` stays light):

- :func:`guidance.dicom.export.export_dicom` - recording/frames -> DICOM files in a folder.
- :func:`guidance.dicom.export.archive` - recording/frames -> spool -> PACS (C-STORE with retries).
- :class:`guidance.dicom.spool.Spool`, :class:`guidance.dicom.spool.Archiver` - store-and-forward.
- :func:`guidance.dicom.network.echo`, :func:`guidance.dicom.network.find_worklist`.
- :func:`guidance.dicom.study.manual_entry`, :class:`guidance.dicom.study.PatientStudy`.
- :mod:`guidance.dicom.writers` - the object writers (US cine, SC byte/word, SEG, burned-in AI overlay).
- :mod:`guidance.dicom.transcode` - streamed lossless compressed / Implicit VR copies for C-STORE.
"""
