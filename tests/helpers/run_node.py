"""Run a node with a test analyzer in its own process: ``python -m tests.helpers.run_node
CONFIG ANALYZER`` (used by the kill -9 tests; ``ich-node run`` always uses the real one)."""

from __future__ import annotations

import faulthandler
import signal
import sys
from pathlib import Path

from node.app import Node
from node.config import load_config
from node.logs import setup_logging


def main(argv: list[str]) -> int:
    # kill -USR1 PID writes every thread's stack to the log (diagnosis of a stall)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    config = load_config(Path(argv[1]))
    setup_logging(config.logging)
    Node(config, analyzer=argv[2], loader=lambda: load_config(Path(argv[1]))).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
