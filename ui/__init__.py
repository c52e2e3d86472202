"""Qt front end (PySide6 + pyqtgraph). The only package that imports Qt.

Registered as the ``qt`` front end in the ``guidance.frontends`` entry-point group (``ui.app:run_app``).
"""
