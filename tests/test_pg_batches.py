"""Files' and batches' records in PostgreSQL (``batch/pg_store``), for real on a throwaway cluster: each owner sees
their own, and a batch's lease is held by one replica at a time and taken over once it lapses. A lease of zero
seconds has lapsed as soon as it is taken, so expiry is tried without waiting on the clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.state_servers import Postgres
from first_jupyter.batch.pg_store import PgBatchState, PgLeases


@pytest.fixture
def replica_states(postgres: Postgres, tmp_path: Path) -> Iterator[tuple[PgBatchState, PgBatchState, PgBatchState]]:
    """Two replicas holding leases of a minute, and one whose leases lapse as soon as taken."""
    states = (PgBatchState(postgres.url, tmp_path, 60.0), PgBatchState(postgres.url, tmp_path, 60.0),
              PgBatchState(postgres.url, tmp_path, 0.0))
    try:
        yield states
    finally:
        for state in states:
            state.close()


def _batch(batch_id: str, input_file_id: str) -> dict[str, object]:
    return {"id": batch_id, "status": "in_progress", "input_file_id": input_file_id}


def test_each_owner_sees_their_own_files_and_batches(replica_states, tmp_path: Path):
    one, other, _ = replica_states
    ada, ada_elsewhere, bob = (one.store(tmp_path / "ada", "ada"), other.store(tmp_path / "ada", "ada"),
                               other.store(tmp_path / "bob", "bob"))
    made = ada.add_file("batch", "in.jsonl", 10, 2)
    assert ada_elsewhere.file(made.id) == made
    assert bob.file(made.id) is None
    assert ada_elsewhere.files(None, None, 10, newest_first=True) == ([made], False)
    output_id, error_id = ada.add_batch(_batch("batch_1", made.id))
    assert ada_elsewhere.result_ids("batch_1") == (output_id, error_id)
    assert (ada_elsewhere.batch("batch_1"), bob.batch("batch_1")) == (_batch("batch_1", made.id), None)
    assert ada_elsewhere.in_use(made.id) == "batch_1"
    bob.request_cancel("batch_1")  # not bob's to cancel
    assert not ada.cancel_requested("batch_1")
    ada_elsewhere.request_cancel("batch_1")
    assert ada.cancel_requested("batch_1")
    ada.save_batch({**_batch("batch_1", made.id), "status": "cancelled"})
    assert ada_elsewhere.in_use(made.id) is None
    assert ada_elsewhere.unfinished() == []


def test_a_lease_is_held_by_one_replica_and_taken_over_once_it_lapses(replica_states, tmp_path: Path):
    one, other, hasty = replica_states
    store = one.store(tmp_path / "ada", "ada")
    store.add_batch(_batch("batch_1", "file-in"))
    assert [b["id"] for b in other.store(tmp_path / "ada", "ada").unfinished()] == ["batch_1"]
    held = PgLeases(one).claim("batch_1")
    assert held is not None
    assert (held.renew_every, held.renew()) == (20.0, True)
    assert PgLeases(other).claim("batch_1") is None  # held: not run twice
    assert other.store(tmp_path / "ada", "ada").unfinished() == []  # nothing for another replica to resume
    assert other.orphaned_owners() == []
    held.release()
    assert other.orphaned_owners() == ["ada"]  # let go: another may take it at once
    lapsing = PgLeases(hasty).claim("batch_1")
    assert lapsing is not None
    assert other.orphaned_owners() == ["ada"]  # its lease lapsed as it was taken (a replica that stopped renewing)
    taken = PgLeases(other).claim("batch_1")
    assert taken is not None
    assert not lapsing.renew()  # the one that lost it learns so at its next renewal, and stops
    lapsing.release()  # (letting go of what another holds changes nothing)
    assert PgLeases(one).claim("batch_1") is None
    assert taken.renew()
