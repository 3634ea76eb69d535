"""One way to read and write the files a user hands us or that a run leaves behind.

``state.json``, ``ledger.json``, ``jobs.json``, a checkpoint's safetensors, an export's input: a
file that is missing, cut short by a kill or a full disk, or not what it should be is a problem the
user fixes (restore it, delete it, pick another checkpoint), not a bug in ettin. Every reader here
turns it into a :class:`FileError` whose one line names the path, says what is wrong and, through
``fix``, what to do. Writers replace a file by one rename, so a reader never sees half of one.

Nothing here imports torch at module level: the launch tools read ``jobs.json`` on a login node.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ettin.errors import EttinError


class FileError(EttinError):
    """A missing, unreadable or damaged file; ``str()`` names the path and what to do."""

    def __init__(self, path: str | Path, problem: str, fix: str | None = None):
        super().__init__(f"{path}: {problem}" + (f"; {fix}" if fix else ""))
        self.path, self.problem, self.fix = Path(path), problem, fix

    def __reduce__(self):  # picklable across processes with its parts
        return type(self), (self.path, self.problem, self.fix)


class UnreadableFile(FileError):
    """The file is there but the system will not read it (an I/O or permission error): maybe passing,
    so not a sign that the file is damaged."""


def _fail(path: Path, problem: str, fix: str | None) -> FileError:
    return FileError(path, problem, fix)


def _unreadable(path: Path, e: OSError, fix: str | None) -> UnreadableFile:
    return UnreadableFile(path, f"cannot be read ({e.strerror or e})", fix)


def read_text(path: str | Path, fix: str | None = None) -> str:
    """The text of ``path``; a missing or unreadable file is a :class:`FileError`."""
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise _fail(path, "not found", fix) from None
    except UnicodeDecodeError as e:
        raise _fail(path, f"is not text ({e})", fix) from None
    except OSError as e:
        raise _unreadable(path, e, fix) from None


def read_json(path: str | Path, fix: str | None = None, expect: type = dict) -> Any:
    """The JSON document in ``path``, which must be a ``expect`` (a truncated file fails here, named)."""
    path = Path(path)
    text = read_text(path, fix)
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"is not valid JSON ({'empty' if not text.strip() else e})", fix) from None
    if not isinstance(body, expect):
        raise _fail(path, f"holds a JSON {type(body).__name__}, not a {expect.__name__}", fix)
    return body


def read_yaml(path: str | Path, fix: str | None = None) -> dict:
    """The YAML mapping in ``path`` (plain data, nothing constructed)."""
    import yaml

    path = Path(path)
    try:
        body = yaml.safe_load(read_text(path, fix))
    except yaml.YAMLError as e:
        raise _fail(path, f"is not valid YAML ({str(e).splitlines()[0]})", fix) from None
    if not isinstance(body, dict):
        raise _fail(path, "does not hold a YAML mapping", fix)
    return body


def open_safetensors(path: str | Path, fix: str | None = None):
    """``safe_open`` on ``path``. safetensors checks at open that the header's tensors cover the
    file exactly, so a file cut short by a kill or a full disk fails here, not mid-load."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "not found", fix)
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise _fail(path, f"is damaged or truncated ({e})", fix) from None
    except OSError as e:
        raise _unreadable(path, e, fix) from None


def load_safetensors(path: str | Path, fix: str | None = None) -> dict:
    """Every tensor of ``path`` by name, read through :func:`open_safetensors`."""
    handle = open_safetensors(path, fix)
    return {name: handle.get_tensor(name) for name in handle.keys()}


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by one rename of a sibling temporary file: readers see the old or the new file.

    The file gets the mode any new file gets (0666 less the umask), not mkstemp's 0600: datasets and run
    folders are shared between users of a cluster."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj, indent: int = 1) -> None:
    """``obj`` as JSON in ``path``, replaced atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
