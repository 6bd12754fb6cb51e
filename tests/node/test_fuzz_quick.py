"""A fixed-seed sample of bench/fuzz.py's store and PDU harnesses (the recorded runs are
10,000 inputs each, docs/fuzzing.md): the same targets and contracts, a few hundred
inputs, so that a regression shows up in the suite."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from node.app import Node
from tests.helpers import fuzzing


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on every malformed value
def test_store_handler_answers_every_malformed_instance_with_a_documented_status() -> None:
    with fuzzing.StoreTarget() as target:
        for choices in fuzzing.iterate(seed=7, count=300):
            target.run(*fuzzing.mutate_instance(choices))
        assert sum(target.statuses.values()) == 300
        assert set(target.statuses) <= fuzzing.StoreTarget.STATUSES
        # the sample reaches both the spool and the refusals
        assert target.statuses.get(0x0000) and target.statuses.get(0xC210)


def test_node_survives_malformed_pdu_streams(make_node: Callable[..., Node]) -> None:
    node = make_node(dicom={"network_timeout_s": 1.0, "acse_timeout_s": 1.0,
                            "max_associations": 64})

    def active() -> int:
        return sum(1 for a in node.ae.active_associations if a.is_acceptor)

    target = fuzzing.PduTarget(node.port, active, wait_s=10.0, echo_every=25)
    try:
        for choices in fuzzing.iterate(seed=9, count=100):
            target.run(fuzzing.mutate_pdus(choices))
        target.check_serving()
    finally:
        target.close()
    assert sum(target.answers.values()) == 100
    assert target.answers.get("A-ABORT")
