"""Coverage-guided fuzzing (atheris) of the code that parses received data (issue 8).

Three harnesses, each a target of ``tests/helpers/fuzzing.py`` (where the contracts
and the structure-aware mutators live; ``docs/fuzzing.md``):

- ``store``: ``node.handlers.handle_store`` with a real DiskSpool in a temporary folder;
- ``pipeline``: ``pipeline.volume.load_volume`` (selection, sorting, volume) on a small
  series with mutated files;
- ``pdu``: raw PDU streams against a node running in this process.

The fuzzer's input is read in two modes, chosen by its first byte: structure-aware
(the rest of the input drives the mutators through a FuzzedDataProvider), or raw (the
rest of the input is itself the data set, or the PDU stream; the seed corpus holds
the valid seeds for this mode). A crash is any exception escaping the target; atheris
stops at the first one and writes the input to ``crash-*`` (reproduce with
``--reproduce FILE``).

    .venv/bin/python bench/fuzz.py store --runs 10000
    .venv/bin/python bench/fuzz.py pipeline --runs 10000 --corpus /tmp/corpus-pipeline
    .venv/bin/python bench/fuzz.py pdu --runs 10000
    .venv/bin/python bench/fuzz.py store --write-corpus DIR   # the seed corpus only

Prints inputs, seconds, crashes, outcomes and (with atheris) covered edges.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RAW_MODE = 0x80  # first byte >= this: the rest of the input is used as it is
REPORT_EVERY = 1000  # inputs between progress lines


def seed_corpus(harness: str) -> list[bytes]:
    """The seed inputs of *harness* (raw mode: a syntax byte, then the bytes)."""
    from tests.helpers import fuzzing

    if harness == "pdu":
        return [bytes([RAW_MODE]) + s for s in fuzzing.pdu_streams()]
    seeds = []
    for syntax, data in fuzzing.seed_datasets():
        seeds.append(bytes([RAW_MODE + fuzzing.SYNTAXES.index(syntax)]) + data)
    seeds += [bytes([i]) + bytes(range(64)) for i in range(4)]  # structure-aware starts
    return seeds


def write_corpus(harness: str, folder: Path) -> int:
    """Write the seed corpus of *harness* into *folder*; returns the number of files."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = seed_corpus(harness)
    for i, seed in enumerate(seeds):
        (folder / f"seed-{i:03d}").write_bytes(seed)
    return len(seeds)


class Harness:
    """One target, the input decoding and the counts."""

    def __init__(self, name: str, fuzzing: Any, provider: Callable[[bytes], Any]) -> None:
        self.name = name
        self.fz = fuzzing
        self.provider = provider
        self.inputs = 0
        self.started = time.monotonic()
        self.node: Any = None
        self._tmp = tempfile.TemporaryDirectory(prefix="ich-fuzz-")
        if name == "store":
            self.target: Any = fuzzing.StoreTarget(Path(self._tmp.name))
        elif name == "pipeline":
            self.target = fuzzing.PipelineTarget()
        else:
            self.target = self._pdu_target()

    def _pdu_target(self) -> Any:
        from node.app import Node
        from tests.conftest import TEST_ANALYZER, node_config

        cfg = node_config(Path(self._tmp.name) / "spool",
                          dicom={"network_timeout_s": 2, "acse_timeout_s": 2,
                                 "max_associations": 64})
        self.node = Node(cfg, analyzer=TEST_ANALYZER)
        self.node.start()

        def active() -> int:
            return sum(1 for a in self.node.ae.active_associations if a.is_acceptor)

        return self.fz.PduTarget(self.node.port, active, wait_s=10.0, echo_every=200)

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        if self.inputs % REPORT_EVERY == 0:  # libFuzzer's normal exit skips atexit
            self.report()
        if not data:
            return
        raw = data[0] >= RAW_MODE
        if self.name == "pdu":
            stream = data[1:] if raw else self.fz.mutate_pdus(
                self.fz.ProviderChoices(self.provider(data[1:])))
            self.target.run(stream)
            return
        choices = self.fz.ProviderChoices(self.provider(data[1:]))
        if self.name == "store":
            if raw:
                syntax = str(self.fz.SYNTAXES[(data[0] - RAW_MODE) % len(self.fz.SYNTAXES)])
                self.target.run(syntax, data[1:])
            else:
                self.target.run(*self.fz.mutate_instance(choices))
            return
        if raw:  # the raw bytes are the data set of one file of an otherwise valid series
            syntax = str(self.fz.SYNTAXES[(data[0] - RAW_MODE) % len(self.fz.SYNTAXES)])
            files = {f"{i:02d}.dcm": self._file(i, str(ExplicitVRLittleEndian), None)
                     for i in range(self.fz.SERIES_SLICES)}
            files["00.dcm"] = self._file(0, syntax, data[1:])
        else:
            files = self.fz.mutate_series(choices)
        self.target.run(files)

    def _file(self, index: int, syntax: str, data: bytes | None) -> bytes:
        """Preamble, file meta and data set (the valid seed slice when *data* is None)."""
        from node.filemeta import PREAMBLE, encode_file_meta

        ds = self.fz.seed_dataset(index)
        meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax,
                                self.fz.FUZZ_ROOT + "0", "FUZZ")
        return bytes(PREAMBLE + meta + (self.fz.encode(ds, syntax) if data is None else data))

    def report(self) -> None:
        """One line: inputs so far, rate and outcomes."""
        seconds = time.monotonic() - self.started
        print(f"harness {self.name}: {self.inputs} inputs in {seconds:.0f} s "
              f"({self.inputs / max(seconds, 1e-9):.0f}/s); outcomes {self.outcomes()}",
              flush=True)

    def outcomes(self) -> dict[str, int]:
        if self.name == "store":
            return {f"0x{k:04X}": v for k, v in sorted(self.target.statuses.items())}
        if self.name == "pipeline":
            return dict(self.target.outcomes)
        return dict(self.target.answers)

    def close(self) -> None:
        if self.name == "pdu":
            self.target.check_serving()
            self.target.close()
            self.node.stop()
        else:
            self.target.close()
        self._tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("harness", choices=["store", "pipeline", "pdu"])
    parser.add_argument("--runs", type=int, default=10000, help="inputs to run")
    parser.add_argument("--corpus", type=Path, help="corpus folder (seeded when empty)")
    parser.add_argument("--write-corpus", type=Path, help="only write the seed corpus here")
    parser.add_argument("--reproduce", type=Path, help="run one input file and exit")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer -seed")
    args = parser.parse_args(argv)
    if args.write_corpus:
        print(f"{write_corpus(args.harness, args.write_corpus)} seeds in {args.write_corpus}")
        return 0

    import atheris

    warnings.simplefilter("ignore")  # pydicom warns on every malformed value
    logging.disable(logging.CRITICAL)  # the node logs every refusal; we count outcomes
    with atheris.instrument_imports():
        import pydicom.filereader  # noqa: F401
        import pynetdicom.pdu  # noqa: F401

        import node.handlers  # noqa: F401
        import node.spool  # noqa: F401
        import node.transport  # noqa: F401
        import pipeline.selection  # noqa: F401
        import pipeline.sorting  # noqa: F401
        import pipeline.volume  # noqa: F401
    from tests.helpers import fuzzing

    harness = Harness(args.harness, fuzzing, atheris.FuzzedDataProvider)
    if args.reproduce:
        harness(args.reproduce.read_bytes())
        print("no crash")
        harness.close()
        return 0
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"ich-fuzz-corpus-{args.harness}-"))
    if not any(corpus.glob("*")):
        write_corpus(args.harness, corpus)
    import atexit

    atexit.register(harness.report)  # after a crash (the normal exit skips atexit)
    atheris.Setup([sys.argv[0], f"-runs={args.runs}", f"-seed={args.seed}",
                   "-rss_limit_mb=8192", "-timeout=60", "-max_len=65536",
                   "-print_final_stats=1", str(corpus)], harness)
    atheris.Fuzz()  # exits the process: 0 when all runs passed, 1 (and crash-*) on a crash
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
