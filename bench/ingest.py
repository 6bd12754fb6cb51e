"""Ingest benchmark (node issue): the same CT series, sent by dcmtk's storescu in one
association, to the node and to reference C-STORE SCPs, in one run.

Receivers, each started fresh (empty folder) for every round so that no run meets
duplicates or a warm index, all on 127.0.0.1 with Nagle off:

- ``storescp``: dcmtk's storescp (``TCP_NODELAY=1``), writes files, no fsync (it has
  no such option);
- ``node``: ``ich-node run`` as a subprocess, ``spool.fsync: true`` (the default);
  the assembly quiet period is an hour so that no job runs during the measurement;
- ``node-nofsync``: the same with ``spool.fsync: false`` (context: the cost of fsync);
- ``orthanc``: the Debian Orthanc with its own config (tests/helpers/orthanc.py),
  ``SyncStorageArea: true`` (its default: fsync per file);
- ``pynetdicom-bare``: a minimal pynetdicom SCP that writes ``encoded_dataset()`` to a
  file and fsyncs it, nothing else: the floor of a pure-Python receiver.

Each receiver gets ``--rounds`` sends; the order alternates every round. The median
wall time of storescu (process start to exit, association and release included) gives
MB/s. The page cache is flushed (``sync``) before every send, outside the timing.

``--profile`` instead runs the node in this process with a profiler on every thread
and prints where the time of one send goes.

Run: ``.venv/bin/python bench/ingest.py`` (about two minutes on two cores).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ICH_NODE = Path(sys.executable).parent / "ich-node"
NODE_PDU = 262144  # node.config.DicomConfig.max_pdu_bytes default
DCMTK_PDU = 16384  # storescp and Orthanc (MaximumPduLength) defaults


def _env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_echo(port: int, aet: str, timeout_s: float = 30.0) -> None:
    """Wait until a C-ECHO to *port* succeeds (the SCP accepts associations)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run([ECHOSCU, "-aec", aet, "127.0.0.1", str(port)],
                              capture_output=True, env=_env(), timeout=30)
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"no C-ECHO answer from {aet} on port {port} within {timeout_s:.0f} s")


def count_files(folder: Path, pattern: str = "*") -> int:
    """Files under *folder* matching *pattern* (recursive)."""
    return sum(1 for p in folder.rglob(pattern) if p.is_file())


# --------------------------------------------------------------------------- receivers


class Receiver(Protocol):
    """A C-STORE SCP started fresh in *workdir* for one send."""

    name: str
    key: str  # the name for --only
    aet: str
    fsync: str
    max_pdu: int

    def start(self, workdir: Path) -> int:
        """Start; return the DICOM port once it accepts associations."""
        ...

    def stored(self) -> int:
        """How many instances it holds."""
        ...

    def note(self) -> str:
        """Extra facts for the last send (may be empty)."""
        ...

    def stop(self) -> None:
        """Stop and clean up."""
        ...


def _terminate(process: subprocess.Popen[Any] | None, timeout_s: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class StoreScp:
    """dcmtk storescp, plain (no --fork), default options but the PDU size."""

    name, key, aet, fsync = "storescp (dcmtk)", "storescp", "STORESCP", "no (no option)"

    def __init__(self, max_pdu: int = DCMTK_PDU) -> None:
        self.max_pdu = max_pdu
        self.process: subprocess.Popen[bytes] | None = None
        self.out: Path | None = None

    def start(self, workdir: Path) -> int:
        self.out = workdir / "out"
        self.out.mkdir(parents=True)
        port = free_port()
        self.process = subprocess.Popen([STORESCP, "-aet", self.aet, "-pdu", str(self.max_pdu),
                                         "-od", str(self.out), str(port)], env=_env(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_echo(port, self.aet)
        return port

    def stored(self) -> int:
        assert self.out is not None
        return count_files(self.out)

    def note(self) -> str:
        return ""

    def stop(self) -> None:
        _terminate(self.process)


class NodeProcess:
    """``ich-node run`` with a config file of its own; jobs held back by the quiet period."""

    aet, max_pdu = "ICH_NODE", NODE_PDU

    def __init__(self, fsync: bool) -> None:
        self.fsync_on = fsync
        self.name = "node" if fsync else "node, fsync off"
        self.key = "node" if fsync else "node-nofsync"
        self.fsync = "yes (file, folder; index WAL NORMAL)" if fsync else "no (spool.fsync false)"
        self.process: subprocess.Popen[bytes] | None = None
        self.spool: Path | None = None
        self.log: Path | None = None
        self.http_port = 0

    def start(self, workdir: Path) -> int:
        import yaml

        port, self.http_port = free_port(), free_port()
        self.spool = workdir / "spool"
        self.log = workdir / "node.log"
        config = {
            "dicom": {"ae_title": self.aet, "host": "127.0.0.1", "port": port,
                      "tcp_nodelay": True},
            "spool": {"path": str(self.spool), "min_free_mb": 1, "fsync": self.fsync_on},
            # No job may start during the measurement (the real analyzer would run).
            "assembly": {"quiet_seconds": 3600, "release_grace_seconds": None},
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "logging": {"level": "INFO"},
        }
        config_path = workdir / "node.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(ICH_NODE), "run", "--config", str(config_path)],
                                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        # The worker process imports its analyzer at start; let it settle first.
        deadline = time.monotonic() + 60
        while not re.search(r"worker \d+ started", self.log.read_text(errors="replace")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        wait_echo(port, self.aet)
        time.sleep(0.5)
        return port

    def stored(self) -> int:
        assert self.spool is not None
        return count_files(self.spool / "instances", "*.dcm")

    def note(self) -> str:
        """Share of the wall time spent inside ``handle_store`` (node metric)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        match = re.search(r"^ich_node_store_seconds_sum (\S+)$", text, re.M)
        return f"handler {float(match.group(1)):.2f} s" if match else ""

    def stop(self) -> None:
        _terminate(self.process)


class OrthancReceiver:
    """Orthanc 1.10 (Debian binary) via tests/helpers/orthanc.py, default storage options."""

    name, key, aet, fsync = "Orthanc", "orthanc", "ORTHANC", "yes (SyncStorageArea)"

    def __init__(self, max_pdu: int = DCMTK_PDU) -> None:
        self.max_pdu = max_pdu
        self.server: Any = None

    def start(self, workdir: Path) -> int:
        from tests.helpers.orthanc import OrthancServer

        self.server = OrthancServer(workdir / "orthanc",
                                    extra_config={"MaximumPduLength": self.max_pdu}).start()
        wait_echo(self.server.dicom_port, self.aet)
        return int(self.server.dicom_port)

    def stored(self) -> int:
        return int(self.server.statistics()["CountInstances"])

    def note(self) -> str:
        return ""

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class BareScp:
    """A pynetdicom SCP that writes and fsyncs the received bytes: nothing else."""

    name, key, aet, fsync = "pynetdicom bare SCP", "bare", "BARE_SCP", "yes (file)"
    max_pdu = NODE_PDU

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.out: Path | None = None

    def start(self, workdir: Path) -> int:
        self.out = workdir / "out"
        self.out.mkdir(parents=True)
        port = free_port()
        self.process = subprocess.Popen([sys.executable, __file__, "--bare-scp", str(port),
                                         str(self.out)], stdout=subprocess.DEVNULL)
        wait_echo(port, self.aet)
        return port

    def stored(self) -> int:
        assert self.out is not None
        return count_files(self.out)

    def note(self) -> str:
        return ""

    def stop(self) -> None:
        _terminate(self.process)


def bare_scp_main(port: int, out: Path) -> None:
    """The bare SCP's process: CT Image Storage, write + fsync per instance."""
    from pynetdicom import AE, evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    def nodelay(event: evt.Event) -> None:
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        path = out / f"{request.AffectedSOPInstanceUID}.dcm"
        with open(path, "wb") as fh:
            fh.write(event.encoded_dataset())
            fh.flush()
            os.fsync(fh.fileno())
        return 0x0000

    ae = AE(ae_title=BareScp.aet)
    ae.maximum_pdu_size = NODE_PDU
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, nodelay)])
    assert server is not None  # block=False returns the server
    stop.wait()
    server.shutdown()


# --------------------------------------------------------------------------- sending


def storescu(port: int, aet: str, files: Sequence[Path]) -> float:
    """Send *files* in one association (Nagle off); return the wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([STORESCU, "-R", "-aet", "BENCH_SCU", "-aec", aet, "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


@dataclass
class Measured:
    """Wall times of one receiver."""

    receiver: Receiver
    seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure_once(receiver: Receiver, files: Sequence[Path], workdir: Path) -> tuple[float, str]:
    """Start *receiver* fresh, send, check every instance arrived, stop."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port = receiver.start(workdir)
    try:
        os.sync()
        seconds = storescu(port, receiver.aet, files)
        stored = receiver.stored()
        if stored != len(files):
            raise RuntimeError(f"{receiver.name} holds {stored} of {len(files)} instances")
        note = receiver.note()
    finally:
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return seconds, note


def make_series(folder: Path, slices: int, rows: int) -> list[Path]:
    """The benchmark series: *slices* CT slices of rows x rows, 16 bit, Explicit VR LE."""
    from tests.helpers.ctseries import write_series

    return write_series(folder, slices, rows=rows, seed=300).files


def machine() -> str:
    """CPU model and count, in words."""
    model = "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def table(results: list[Measured], megabytes: float) -> str:
    """The results as a markdown table."""
    lines = ["| receiver | fsync | max PDU received | median s | MB/s | runs (s) | note |",
             "|---|---|---:|---:|---:|---|---|"]
    for m in results:
        r = m.receiver
        runs = ", ".join(f"{s:.2f}" for s in m.seconds)
        lines.append(f"| {r.name} | {r.fsync} | {r.max_pdu} | {m.median:.2f} | "
                     f"{megabytes / m.median:.1f} | {runs} | {'; '.join(n for n in m.notes if n)} |")
    return "\n".join(lines)


def run_benchmark(slices: int, rows: int, rounds: int, keep: Path | None,
                  dcmtk_pdu: int = DCMTK_PDU, only: Sequence[str] = ()) -> int:
    """Generate the series, measure every receiver, print the table and the ratios."""
    base = keep or Path(tempfile.mkdtemp(prefix="ich-bench-"))
    try:
        t0 = time.perf_counter()
        files = make_series(base / "series", slices, rows)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {slices} slices {rows}x{rows} int16, {megabytes:.1f} MB "
              f"(written in {time.perf_counter() - t0:.1f} s)", flush=True)
        receivers: list[Receiver] = [StoreScp(dcmtk_pdu), NodeProcess(fsync=True),
                                     OrthancReceiver(dcmtk_pdu),
                                     BareScp(), NodeProcess(fsync=False)]
        if only:  # a quick look at some receivers; the ratios need storescp, node and Orthanc
            receivers = [r for r in receivers if r.key in only]
        results = [Measured(r) for r in receivers]
        for round_no in range(rounds):
            order = results if round_no % 2 == 0 else list(reversed(results))
            for m in order:
                seconds, note = measure_once(m.receiver, files, base / "receiver")
                m.seconds.append(seconds)
                m.notes.append(note)
                print(f"round {round_no + 1}: {m.receiver.name:22s} {seconds:6.2f} s "
                      f"{megabytes / seconds:7.1f} MB/s {note}", flush=True)
    finally:
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)
    by_name = {m.receiver.name: m for m in results}
    print()
    print(f"{datetime.date.today().isoformat()}, {machine()}; {slices} x {rows}x{rows} "
          f"({megabytes:.1f} MB), storescu one association, TCP_NODELAY=1, median of {rounds}")
    print()
    print(table(results, megabytes))
    print()
    node, scp, orthanc = (by_name.get(n) for n in ("node", "storescp (dcmtk)", "Orthanc"))
    if node is not None and scp is not None:
        vs_scp = scp.median / node.median
        print(f"node / storescp throughput: {vs_scp:.2f} (target >= 0.3: "
              f"{'met' if vs_scp >= 0.3 else 'MISSED'})")
    if node is not None and orthanc is not None:
        vs_orthanc = orthanc.median / node.median
        print(f"node / Orthanc throughput:  {vs_orthanc:.2f} (target >= 1.3: "
              f"{'met' if vs_orthanc >= 1.3 else 'MISSED'})")
    return 0


# --------------------------------------------------------------------------- profiling


# Rows worth reading: the node, pynetdicom, pydicom and the system calls of a store; idle
# threads waiting on locks and selectors (scheduler, sender, HTTP) are left out.
PROFILE_ROWS = (r"node/|pynetdicom/|pydicom/|apscheduler/base|fsync|sqlite3|sha256|io.open|"
                r"BufferedWriter|recv|send|select.select|time.sleep|posix")


def profile_node(slices: int, rows: int, top: int) -> int:
    """Run a node in this process with cProfile on every thread; print where one send's
    time goes (tottime and cumulative)."""
    from node.app import Node
    from node.config import load_config
    from node.logs import setup_logging

    base = Path(tempfile.mkdtemp(prefix="ich-bench-profile-"))
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def _per_thread(frame: Any, event: str, arg: Any) -> None:
        profiler = cProfile.Profile()
        with lock:
            profiles.append(profiler)
        profiler.enable()  # replaces this hook for the new thread

    try:
        files = make_series(base / "series", slices, rows)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        config = load_config(None, {
            "dicom": {"host": "127.0.0.1", "port": 0},
            "spool": {"path": str(base / "spool"), "min_free_mb": 1, "fsync": True},
            "assembly": {"quiet_seconds": 3600, "release_grace_seconds": None},
            "http": {"port": 0}, "logging": {"level": "WARNING"},
        }, environ={})
        setup_logging(config.logging)  # as `ich-node run` does (pynetdicom's log handlers)
        node = Node(config)
        threading.setprofile(_per_thread)
        node.start()
        try:
            time.sleep(2.0)  # the worker process imports its analyzer
            os.sync()
            seconds = storescu(node.port, "ICH_NODE", files)
        finally:
            threading.setprofile(None)
            node.stop()
        print(f"node, profiled (slower than unprofiled): {seconds:.2f} s, "
              f"{megabytes / seconds:.1f} MB/s for {len(files)} instances")
        for profiler in profiles:
            profiler.disable()
        used = [p for p in profiles if p.getstats()]
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(*used, stream=out).sort_stats(key).print_stats(PROFILE_ROWS, top)
            print(out.getvalue())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run one mode."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices (default 300)")
    parser.add_argument("--rows", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="sends per receiver (default 3)")
    parser.add_argument("--dcmtk-pdu", type=int, default=DCMTK_PDU,
                        help="max PDU that storescp and Orthanc receive (default 16384, their "
                             "own default; at most 131072)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep the series")
    parser.add_argument("--only", nargs="+", default=(), metavar="RECEIVER",
                        choices=("storescp", "node", "orthanc", "bare", "node-nofsync"),
                        help="measure only these receivers (storescp node orthanc bare "
                             "node-nofsync); the default is all five")
    parser.add_argument("--profile", action="store_true",
                        help="profile one send to an in-process node instead")
    parser.add_argument("--top", type=int, default=30, help="rows of profile output")
    parser.add_argument("--bare-scp", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_scp:
        bare_scp_main(int(args.bare_scp[0]), Path(args.bare_scp[1]))
        return 0
    missing = [t for t in (STORESCU, STORESCP, ECHOSCU, str(ICH_NODE)) if not Path(t).exists()]
    if missing:
        print(f"missing: {', '.join(missing)} (dcmtk, and `pip install -e .` in this venv)",
              file=sys.stderr)
        return 2
    run: Callable[[], int] = (
        (lambda: profile_node(args.slices, args.rows, args.top)) if args.profile
        else (lambda: run_benchmark(args.slices, args.rows, args.rounds, args.keep,
                                    args.dcmtk_pdu, args.only)))
    return run()


if __name__ == "__main__":
    sys.exit(main())
