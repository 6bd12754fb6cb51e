"""Logging set-up: plain text or JSON lines, one format for the node and its worker.

Log records carry UIDs, calling AE titles and timings, never patient names or IDs.
Our own modules never log data-set values other than UIDs. Libraries are held to the
same rule here (docs/security.md):

- pynetdicom prints every PDU and data set (patient module included) at DEBUG: its
  logger stays at WARNING or above whatever ``logging.level`` says.
- pydicom quotes the offending value when a value breaks its VR ("Invalid value for VR
  DA: '1937-04-12'"), through its logger and through ``warnings``: warnings are routed
  into logging, and :class:`WithholdValues` replaces every quoted value in pydicom's
  records and in warnings with ``'<withheld>'``.
- A job that fails on a library's exception (``ValueError: Unable to convert
  '1937-04-12' to 'DA' object``) has its reason and traceback passed through
  :func:`withhold_values` before they are logged or stored (``node.worker``); the
  pipeline's own errors (``PipelineError``) state rules, not values, and stay as written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from pynetdicom import _config as pynetdicom_config

from node.config import LoggingConfig

LOGGER = logging.getLogger(__name__)

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"

# Loggers whose messages may quote data-set values (py.warnings: the warnings module).
_VALUE_QUOTING_LOGGERS = ("pydicom", "py.warnings")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def withhold_values(text: str) -> str:
    """*text* with every quoted value replaced by ``'<withheld>'`` (for messages of
    libraries, which may quote a data-set value such as a birth date)."""
    return _QUOTED.sub("'<withheld>'", text)


class WithholdValues(logging.Filter):
    """Replace quoted values in records of libraries that quote data-set values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_VALUE_QUOTING_LOGGERS):
            record.msg = withhold_values(record.getMessage())
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: LoggingConfig) -> None:
    """Configure the root logger to stderr in the configured format and level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(WithholdValues())
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    logging.captureWarnings(True)  # warnings (pydicom's quote values) pass WithholdValues
    # pynetdicom logs every PDU and data set at DEBUG and each association at INFO.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # Its standard event handlers format every PDU and DIMSE message for those DEBUG and
    # INFO lines, on every C-STORE, whether or not the lines are printed: with the logger
    # at WARNING they only cost time (about a tenth of the node's receive path).
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
