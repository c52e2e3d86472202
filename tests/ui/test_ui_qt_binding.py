"""Guard against a Qt binding that corrupts reference counts.

PySide6-Essentials 6.12.0 on CPython 3.11 drops a reference to ``None`` on every call of a void C++
method (``QPainter.drawPath``, ``setPen``, ...). ``None`` is not immortal before 3.12, so the app aborts
with "Fatal Python error: none_dealloc" after a few seconds of painting. 6.11.3 is fine.
"""

from __future__ import annotations

import sys

import pytest
from PySide6.QtCore import QPointF
from PySide6.QtGui import QColor, QImage, QPainter, QPainterPath, QPen


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None is immortal from Python 3.12 on")
def test_ui_qt_void_calls_keep_none_refcount() -> None:
    img = QImage(32, 32, QImage.Format.Format_ARGB32)
    painter = QPainter(img)
    try:
        path = QPainterPath(QPointF(0, 0))
        path.lineTo(20, 20)
        pen = QPen(QColor("#00e5ff"))
        painter.setPen(pen)
        painter.drawPath(path)
        before = sys.getrefcount(None)
        for _ in range(200):
            painter.setPen(pen)
            painter.drawPath(path)
        drift = sys.getrefcount(None) - before
    finally:
        painter.end()
    assert drift > -50, f"Qt binding leaks references to None ({drift} per 400 calls): use PySide6 != 6.12.0"
