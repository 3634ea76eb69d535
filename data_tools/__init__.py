"""Command-line data tools: ``python -m data_tools {prepare,train-tokenizer,inspect} ...``.

The same tools as ``ettin data ...``: the arguments and handlers live in
:mod:`ettin.data.commands`, and these modules only run them. Each tool also runs alone
(``python -m data_tools.prepare``); every user mistake ends as one ``error: ...`` line and exit
code 2.
"""
