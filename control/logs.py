"""The daemons' logs (gateway and center): one line per event, key=value fields.

    ts=2026-11-23T10:02:03.412Z level=info event=vm.moved vm=vm1 from=gwv1 to=gwv2 ms=3.1

`configure()` is the one place the format is set up; `event()` writes an event.
A plain message (a library's, or `log.warning("...")`) becomes
`logger=NAME msg="..."`. A record with an exception (a bug, logged by
`log.exception`) is followed by its traceback; operator errors are logged
without one. Under systemd (stderr is the journal) the timestamp is left out:
the journal keeps its own."""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

_PLAIN = re.compile(r'[^\s="\\]+')


def quote(value: Any) -> str:
    """A value as logfmt writes it: bare when it has no space, quote, backslash or '='."""
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e15 else repr(value)
    elif value is None:
        text = "-"
    else:
        text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log event `name` (e.g. "vm.moved") with its fields, in the order given."""
    logger.log(level, name, extra={"event_fields": fields})


class KeyValueFormatter(logging.Formatter):
    def __init__(self, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.timestamps:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            parts.append(f"ts={stamp}.{int(record.msecs):03d}Z")
        parts.append(f"level={record.levelname.lower()}")
        fields = getattr(record, "event_fields", None)
        if fields is None:
            parts += [f"logger={record.name}", f"msg={quote(record.getMessage())}"]
        else:
            parts.append(f"event={record.msg}")
            parts += [f"{key}={quote(value)}" for key, value in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the journal's device:inode when stderr goes there."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def configure(level: int = logging.INFO) -> None:
    """Send every log record to stderr as one key=value line (called once per process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(timestamps=not _stderr_is_journal()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
