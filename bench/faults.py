"""Fault benchmark: many kill -9 trials and a long destination outage (the long versions of
``tests/faults/``).

Kill trials (``--trials``, default 50): :func:`tests.helpers.faults.run_kill_trial` with
``--peers`` peers (default 4) sending a ``--slices``-slice series each at the same time; the
phase of each trial (receive, fsync, assembly, inference, sending) is drawn from a seeded
random sequence that covers every phase equally; what the node was doing at the kill is
recorded. Each trial checks the invariants (acknowledged = durable, one done job per
series, results at both destinations, duplicates only when a send was hit, no stuck rows).

Outage (``--outage`` seconds, default 120; 0 skips it): the destination is down while
``--outage-studies`` studies arrive and are analysed; then it comes back. Reported: results
queued during the outage, delivered after it, lost, and how long the queue took to drain.

Run: ``.venv/bin/python bench/faults.py --out faults.json`` (about 15 minutes on 2 cores).
The node logs of trials that found a problem are kept in ``faults.logs/``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from traffic import machine  # noqa: E402

from tests.helpers.ctseries import write_series  # noqa: E402
from tests.helpers.faults import PHASES, run_kill_trial  # noqa: E402
from tests.helpers.net import free_port, pynetdicom_send, wait_until  # noqa: E402
from tests.helpers.nodeproc import NodeProcess  # noqa: E402
from tests.helpers.receiver import Receiver  # noqa: E402


def kill_trials(n: int, seed: int, peers: int, slices: int, logs: Path) -> dict[str, Any]:
    """Run *n* kill trials; totals and every trial."""
    rng = random.Random(seed)
    phases = [PHASES[i % len(PHASES)] for i in range(n)]
    rng.shuffle(phases)
    trials = []
    for index, phase in enumerate(phases):
        with tempfile.TemporaryDirectory(prefix="kill-") as tmp:
            try:
                result = run_kill_trial(Path(tmp), phase, seed=seed * 1000 + index,
                                        peers=peers, slices=slices, keep_log=logs).as_dict()
            except Exception as exc:  # the trial boundary: a failed trial, with its reason
                result = {"phase": phase, "seed": seed * 1000 + index,
                          "problems": [f"{type(exc).__name__}: {str(exc)[:2000]}"]}
        trials.append(result)
        print(f"trial {index + 1}/{n} {phase:9s} observed={result.get('observed')} "
              f"acked={result.get('acked_before_kill')} lost={result.get('lost')} "
              f"dup_analyses={result.get('duplicate_analyses')} "
              f"dup_results={result.get('results_duplicated')} "
              f"problems={len(result['problems'])} {result.get('seconds')} s", flush=True)

    def total(key: str) -> int:
        return sum(int(t.get(key) or 0) for t in trials)

    observed: Counter[str] = Counter()
    for t in trials:
        observed.update(t.get("observed") or [])
    return {
        "trials": n, "peers": peers, "slices": slices,
        "phases_targeted": dict(Counter(phases)), "phases_observed_at_kill": dict(observed),
        "kills_during_fsync": sum(1 for t in trials if "fsync" in (t.get("observed") or [])),
        "acknowledged_before_kill": total("acked_before_kill"),
        "acknowledged_total": total("acked_total"), "lost": total("lost"),
        "series": total("series"), "done_jobs": total("done_jobs"),
        "analyses_interrupted_and_rerun": total("analyses_started") - total("analyses_finished"),
        "duplicate_analyses": total("duplicate_analyses"),
        "early_analyses": total("early_analyses"),
        "results_expected": total("results_expected"),
        "results_missing": total("results_missing"),
        "results_duplicated": total("results_duplicated"),
        "trials_with_problems": sum(1 for t in trials if t["problems"]),
        "trial_seconds_median": sorted(float(t.get("seconds") or 0) for t in trials)[n // 2],
        "trials_detail": trials,
    }


def outage(seconds: float, studies: int, slices: int) -> dict[str, Any]:
    """The destination is down for *seconds* while *studies* arrive; then it is back."""
    with tempfile.TemporaryDirectory(prefix="outage-") as tmp:
        work = Path(tmp)
        port = free_port()
        node = NodeProcess(work, destinations={"pacs": port}, overrides={
            "outbound": {"max_attempts": 1000, "backoff_initial_s": 1.0, "backoff_max_s": 10.0},
            "assembly": {"quiet_seconds": 2.0, "release_grace_seconds": 0.5},
            "logging": {"level": "WARNING"}})
        receiver = Receiver(port)
        try:
            node.start()
            down_at = time.monotonic()
            series = [write_series(work / f"s{i}", slices, rows=64, seed=500 + i)
                      for i in range(studies)]
            acked = 0
            for s in series:
                acked += pynetdicom_send(node.port, s.files, calling_ae="OUTAGE").count(0)
                time.sleep(max(0.0, seconds / studies / 2 - 0.05))
            wait_until(lambda: len(node.query("SELECT 1 FROM jobs WHERE state = 'done'"))
                       == studies, 300, interval=0.5, what="every study analysed")
            time.sleep(max(0.0, seconds - (time.monotonic() - down_at)))
            down_s = time.monotonic() - down_at
            attempts = node.query("SELECT SUM(attempts) FROM outbound")[0][0]
            queued = len(node.query("SELECT 1 FROM outbound WHERE state != 'sent'"))
            receiver.start()
            back_at = time.monotonic()
            wait_until(lambda: not node.query("SELECT 1 FROM outbound WHERE state != 'sent'"),
                       600, interval=0.2, what="the queue to drain")
            drained_s = time.monotonic() - back_at
            expected = {str(uid) for (uid,) in node.query("SELECT sop_uid FROM instances")}
            results = len(node.query("SELECT 1 FROM outbound"))
        finally:
            node.stop()
            receiver.stop()
    return {"outage_seconds": round(down_s, 1), "studies": studies,
            "instances_acknowledged": acked, "instances_in_spool": len(expected),
            "failed_attempts_during_outage": attempts, "results_waiting_at_return": queued,
            "results_delivered": len(receiver.received), "results_expected": results,
            "results_lost": results - len(receiver.received),
            "duplicates": receiver.total() - len(receiver.received),
            "drain_seconds_after_return": round(drained_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--outage", type=float, default=120.0, help="seconds; 0 = skip")
    parser.add_argument("--outage-studies", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("faults.json"))
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the node under test is stopped (finally blocks)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in
                                                             vars(args).items()}}
    started = time.monotonic()
    if args.trials:
        report["kill"] = kill_trials(args.trials, args.seed, args.peers, args.slices,
                                     args.out.with_suffix(".logs"))
    if args.outage:
        report["outage"] = outage(args.outage, args.outage_studies, args.slices)
    report["minutes"] = round((time.monotonic() - started) / 60, 1)
    args.out.write_text(json.dumps(report, indent=1))
    short = {k: v for k, v in report.get("kill", {}).items() if k != "trials_detail"}
    print(json.dumps({"machine": report["machine"], "kill": short,
                      "outage": report.get("outage"), "minutes": report["minutes"]}, indent=1))
    kill_ok = not args.trials or (short["lost"] == 0 and short["trials_with_problems"] == 0)
    outage_ok = not args.outage or report["outage"]["results_lost"] == 0
    return 0 if kill_ok and outage_ok else 1


if __name__ == "__main__":
    sys.exit(main())
