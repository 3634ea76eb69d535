"""Command lines over :mod:`ettin.launch` (run from the repo root): ``python -m launch.submit``,
``python -m launch.status``, ``python -m launch.cancel``. The logic lives in the library."""
