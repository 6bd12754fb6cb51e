"""kill -9 of the node at seeded points while three peers send, then restart.

One trial per phase (receive, fsync, assembly, inference, sending); the machinery and the
invariants are in :mod:`tests.helpers.faults`, shared with ``bench/faults.py`` (50 trials).
Every instance acknowledged with Success is in the spool after the restart; each series has
exactly one done job over all its instances; each result reaches both destinations, twice
only when the kill fell while results were being sent (at-least-once delivery); nothing is
left half-way (no ``processing``/``sending`` rows, no partial files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.faults import PHASES, run_kill_trial

SEEDS = {"receive": 11, "fsync": 12, "assembly": 13, "inference": 14, "sending": 15}


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_kill9_keeps_every_promise(tmp_path: Path, phase: str) -> None:
    result = run_kill_trial(tmp_path, phase, seed=SEEDS[phase])
    assert result.problems == [], result.as_dict()
    assert result.lost == 0
    assert result.acked_total == 60 and result.done_jobs == 3
    assert result.results_expected == 6 and result.results_missing == 0
    if phase in ("receive", "fsync"):
        assert 0 < result.acked_before_kill < 60  # the kill really cut the transfers
    if phase == "inference":
        # the interrupted analysis ran again and left no second done job
        assert result.analyses_started > result.analyses_finished - result.duplicate_analyses
