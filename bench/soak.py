"""Soak: send studies to one node for a long time and watch its memory and open files.

A node (own process, ``tests.helpers.run_node``) with the real pipeline (default) or the test
analyzer, one result destination, retention short enough to purge during the run. Senders
(``--senders``, default 1) send a new study (fresh UIDs) every ``--interval`` seconds each.
Every ``--sample`` seconds the RSS and open file descriptors of the node and its worker are
recorded (psutil). At the end: every study sent must be analysed and its results delivered.

Reported: studies sent, analysed, results, failures; RSS and descriptors at start (first
sample after the first result: models loaded), end, max, and the mean of the first and last
fifth of the run (flat = the last fifth within a few MiB of the first).

Run: ``.venv/bin/python bench/soak.py --minutes 30`` (writes ``--out`` JSON).
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
    renamed,
    send_until_stored,
    templates,
)

from tests.helpers.net import free_port, wait_until  # noqa: E402
from tests.helpers.nodeproc import NodeProcess  # noqa: E402


def _sender(index: int, port: int, studies: list[Any], interval_s: float, until: float,
            sent: list[Sent], failures: list[str], lock: threading.Lock) -> None:
    n = 0
    while time.time() < until:
        start = time.time()
        study = renamed(studies[n % len(studies)], f"soak-{index}-{n}")
        result, errors = send_until_stored(port, study, f"SOAK{index}")
        with lock:
            sent.append(result)
            failures.extend(errors)
        n += 1
        time.sleep(max(0.0, interval_s - (time.time() - start)))


def _summary(values: list[float]) -> dict[str, float]:
    fifth = max(1, len(values) // 5)
    return {"start": values[0], "end": values[-1], "max": max(values), "min": min(values),
            "first_fifth_mean": round(statistics.mean(values[:fifth]), 1),
            "last_fifth_mean": round(statistics.mean(values[-fifth:]), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="sending time (default 30)")
    parser.add_argument("--analyzer", choices=sorted(ANALYZERS), default="real")
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between studies per sender (default 10)")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--sample", type=float, default=10.0, help="sampling period, s")
    parser.add_argument("--out", type=Path, default=Path("soak.json"))
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the node under test is stopped (finally blocks)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    info: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in
                                                           vars(args).items()}}
    log_to(args.out.with_suffix(".bench.log"))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        studies = templates(args.analyzer, work, 4, args.slices, args.rows, seed=7)
        receiver = TimedReceiver(free_port()).start()
        node = NodeProcess(work, analyzer=ANALYZERS[args.analyzer],
                           destinations={"pacs": receiver.port},
                           overrides={"assembly": {"quiet_seconds": 5.0,
                                                   "release_grace_seconds": 0.5},
                                      "retention": {"done_hours": 0.05,
                                                    "sweep_interval_s": 60.0},
                                      "logging": {"level": "INFO"}})
        sent: list[Sent] = []
        failures: list[str] = []
        lock = threading.Lock()
        try:
            node.start()
            assert node.proc is not None
            sampler = Sampler(node.proc.pid, args.sample)
            sampler.start()
            began = time.time()
            until = began + args.minutes * 60
            threads = [threading.Thread(target=_sender, args=(i, node.port, studies,
                                                              args.interval, until, sent,
                                                              failures, lock))
                       for i in range(args.senders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wanted = {s.study_uid for s in sent}
            wait_until(lambda: wanted <= receiver.first_result.keys() or bool(
                node.query("SELECT 1 FROM jobs WHERE state = 'failed'")), 600, interval=1.0,
                what="results of every study")
            wait_until(lambda: not node.query("SELECT 1 FROM jobs WHERE state IN"
                                              " ('ready', 'processing')"), 600, interval=1.0,
                       what="an idle worker")
            sampler.stop()
            jobs = dict(node.query("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            outbound = dict(node.query("SELECT state, COUNT(*) FROM outbound GROUP BY state"))
            purged = node.query("SELECT COUNT(*) FROM series WHERE purged_at IS NOT NULL")[0][0]
            code = node.terminate()
        finally:
            node.stop()
            receiver.stop()
            shutil.copy(node.log, args.out.with_suffix(".node.log"))
        warm = next((i for i, s in enumerate(sampler.samples)
                     if receiver.first_result and s.t >= min(receiver.first_result.values())),
                    0)
        samples = sampler.samples[warm:] or sampler.samples
        acked = sum(1 for s in sent for c in s.statuses if c == 0)
        lost = [s.study_uid for s in sent if s.study_uid not in receiver.first_result]
        info["result"] = {
            "minutes": round((time.time() - began) / 60, 1),
            "studies_sent": len(sent), "instances_acknowledged": acked,
            "instances_refused": sum(1 for s in sent for c in s.statuses if c != 0),
            "studies_without_results": len(lost),
            "transfers_failed_and_resent": len(failures), "transfer_errors": failures[:20], "jobs": jobs, "outbound": outbound,
            "series_purged_by_retention": purged, "node_exit_code": code,
            "samples": len(samples),
            "rss_mib_total": _summary([s.total_rss_mib for s in samples]),
            "rss_mib_by_process_end": samples[-1].rss_mib,
            "open_fds_total": _summary([float(s.total_fds) for s in samples]),
            "rss_mib_slope_per_minute": round(statistics.linear_regression(
                [s.t / 60 for s in samples], [s.total_rss_mib for s in samples]).slope, 2)
            if len(samples) > 1 else None,
            "trace": [(round(s.t - began), s.total_rss_mib, s.total_fds, s.rss_mib)
                      for s in samples],
        }
    args.out.write_text(json.dumps(info, indent=1))
    short = {k: v for k, v in info["result"].items() if k != "trace"}
    print(json.dumps({"machine": info["machine"], "result": short}, indent=1))
    return 0 if not lost and acked == sum(len(s.statuses) for s in sent) else 1


if __name__ == "__main__":
    sys.exit(main())
