"""The DIMSE door's presentation contexts are shared by its associations, not copied for
each (pynetdicom's deep copy of them cost 33 ms of CPU per association), and
negotiation over them still works, association after association."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from cluster.doors.dimse.door import DimseDoor, DimseSettings


@pytest.fixture
def door() -> Iterator[DimseDoor]:
    # C-ECHO and negotiation never reach the archive.
    door = DimseDoor(None, DimseSettings(port=0), asyncio.new_event_loop())  # type: ignore[arg-type]
    door.start()
    try:
        yield door
    finally:
        door.stop()


def test_every_association_negotiates_over_the_same_contexts(door: DimseDoor) -> None:
    server = door._server
    assert copy.deepcopy(server.contexts) is server.contexts
    caller = AE(ae_title="MODALITY")
    caller.add_requested_context(Verification)
    caller.add_requested_context(CTImageStorage)
    for _ in range(2):
        assoc = caller.associate("127.0.0.1", door.port, ae_title="STRATA")
        assert assoc.is_established
        try:
            # (The one before may still be ending: its threads outlive it briefly.)
            (serving,) = [a for a in server.active_associations if a.is_established]
            assert serving.acceptor.supported_contexts is server.contexts
            assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == {
                Verification,
                CTImageStorage,
            }
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
