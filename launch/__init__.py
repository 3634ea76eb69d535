"""``python -m launch.submit``, ``python -m launch.status``, ``python -m launch.cancel``: the old names of
``ettin launch submit|status|cancel``, installed with ettin. The parsers and the logic live in :mod:`ettin.launch`."""
