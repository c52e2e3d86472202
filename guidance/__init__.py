"""The application layer: pipeline, interpretation, latency accounting, sessions, archive, CLI.

Never imports Qt (checked by import-linter); runs and is tested headless.
"""

__version__ = "0.1.0"
