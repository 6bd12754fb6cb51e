"""Load: ``--senders`` concurrent senders (default 8) × ``--studies`` studies each (default 20)
to one node; every study must be analysed and its result delivered.

Each sender is a thread with its own association per study (pynetdicom SCU, Nagle off) and
sends its studies back to back; each study is a copy of a template with fresh UIDs
(bench/traffic.py). The node runs in its own process (``tests.helpers.run_node``) with the
test analyzer by default (one Secondary Capture per series: this measures the node, not the
models) or the real pipeline (``--analyzer real``, phantom head CTs).

Reported: instances acknowledged and refused, wall time of the sending, ingest rate, the
time until the last result arrived, per-study latency from the last acknowledgement to the
first result at the destination (median, 95th percentile, max), studies without results,
results delivered twice, jobs by state.

Run: ``.venv/bin/python bench/load.py --out load.json`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from traffic import (  # noqa: E402
    ANALYZERS,
    Sampler,
    Sent,
    TimedReceiver,
    log_to,
    machine,
    percentile,
    renamed,
    send_until_stored,
    templates,
)

from tests.helpers.net import free_port, wait_until  # noqa: E402
from tests.helpers.nodeproc import NodeProcess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--studies", type=int, default=20, help="studies per sender")
    parser.add_argument("--analyzer", choices=sorted(ANALYZERS), default="test")
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("load.json"))
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the node under test is stopped (finally blocks)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in
                                                             vars(args).items()}}
    log_to(args.out.with_suffix(".bench.log"))
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        work = Path(tmp)
        bases = templates(args.analyzer, work, 4, args.slices, args.rows, seed=11)
        receiver = TimedReceiver(free_port()).start()
        node = NodeProcess(work, analyzer=ANALYZERS[args.analyzer],
                           destinations={"pacs": receiver.port},
                           overrides={"assembly": {"quiet_seconds": 5.0,
                                                   "release_grace_seconds": 0.5},
                                      "logging": {"level": "INFO"}})
        sent: list[Sent] = []
        failures: list[str] = []
        lock = threading.Lock()

        def sender(index: int) -> None:
            for n in range(args.studies):
                study = renamed(bases[(index + n) % len(bases)], f"load-{index}-{n}")
                result, errors = send_until_stored(node.port, study, f"LOAD{index}")
                with lock:
                    sent.append(result)
                    failures.extend(errors)

        try:
            node.start()
            assert node.proc is not None
            sampler = Sampler(node.proc.pid, 2.0)
            sampler.start()
            began = time.time()
            threads = [threading.Thread(target=sender, args=(i,)) for i in range(args.senders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sending_s = time.time() - began
            wanted = {s.study_uid for s in sent}
            wait_until(lambda: wanted <= receiver.first_result.keys(), 1800, interval=0.5,
                       what="a result for every study")
            wait_until(lambda: not node.query("SELECT 1 FROM outbound WHERE state != 'sent'"),
                       120, interval=0.5, what="every outbound row sent")
            all_done_s = max(receiver.first_result.values()) - began
            sampler.stop()
            jobs = dict(node.query("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            spooled = node.query("SELECT COUNT(*), SUM(size) FROM instances")[0]
        finally:
            node.stop()
            receiver.stop()
            shutil.copy(node.log, args.out.with_suffix(".node.log"))
    acked = sum(1 for s in sent for c in s.statuses if c == 0)
    latencies = [receiver.first_result[s.study_uid] - s.finished for s in sent
                 if s.study_uid in receiver.first_result]
    report["result"] = {
        "studies_sent": len(sent), "instances_sent": sum(len(s.statuses) for s in sent),
        "instances_acknowledged": acked, "instances_in_spool": spooled[0],
        "studies_without_results": len(wanted - receiver.first_result.keys()),
        "transfers_failed_and_resent": len(failures), "transfer_errors": failures[:20],
        "results_duplicated": receiver.total() - len(receiver.received), "jobs": jobs,
        "sending_seconds": round(sending_s, 1),
        "ingest_instances_per_s": round(acked / sending_s, 1),
        "ingest_mb_per_s": round((spooled[1] or 0) / 2**20 / sending_s, 1),
        "last_result_after_s": round(all_done_s, 1),
        "studies_per_minute_end_to_end": round(len(sent) / all_done_s * 60, 1),
        "latency_s": {"median": round(statistics.median(latencies), 2),
                      "p95": round(percentile(latencies, 0.95), 2),
                      "max": round(max(latencies), 2)},
        "rss_mib_max": max(s.total_rss_mib for s in sampler.samples),
        "open_fds_max": max(s.total_fds for s in sampler.samples),
        "association_send_seconds_median": round(statistics.median(
            s.finished - s.started for s in sent), 2),
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    ok = (acked == report["result"]["instances_sent"]
          and report["result"]["studies_without_results"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
