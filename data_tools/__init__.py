"""Command-line data tools: ``python -m data_tools {prepare,train-tokenizer,inspect} ...``.

Thin argparse front ends over :mod:`ettin.data.prepare`, :mod:`ettin.data.tokenizer` and
:mod:`ettin.data.summary`. Each tool also runs alone (``python -m data_tools.prepare``); every
user mistake ends as one ``error: ...`` line and exit code 2.
"""
