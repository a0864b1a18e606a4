"""The clients' verdicts of a drill: lost writes and dual activity, from records the test writes."""

from __future__ import annotations

from scenarios.clients import Ack, Era, Eras, Worker, dual_active, load_workers, save_workers

A, B = ("127.0.0.1", 1), ("127.0.0.1", 2)
NODES = {A: "a", B: "b"}
ERAS = [Era("a", 2, 0.0), Era("b", 6, 10.0), Era("a", 10, 20.0)]


def test_a_clean_handover_is_not_dual_activity() -> None:
    acks = [Ack(A, 1.0, 1.1), Ack(A, 9.0, 9.2), Ack(B, 10.5, 10.6), Ack(B, 19.0, 19.1), Ack(A, 21.0, 21.1)]
    assert dual_active(acks, ERAS, NODES) == []


def test_an_old_node_answering_a_request_sent_after_the_new_one_answered_is_dual_activity() -> None:
    acks = [Ack(A, 1.0, 1.1), Ack(B, 10.5, 10.6), Ack(A, 10.7, 10.8)]     # a served after b had
    (problem,) = dual_active(acks, [Era("a", 2, 0.0), Era("b", 6, 10.0)], NODES)
    assert "node a (token 2)" in problem and "node b (token 6)" in problem
    # an answer of the old node that was merely slow to arrive is no proof
    assert dual_active([Ack(A, 9.9, 10.9), Ack(B, 10.5, 10.6)], [Era("a", 2, 0.0), Era("b", 6, 10.0)], NODES) == []


def test_eras_gather_every_status_a_node_ever_wrote() -> None:
    eras = Eras()
    eras.observe({"node": "a", "role_changes": [{"at": 0.0, "role": "primary", "token": 2}]})
    eras.observe({"node": "a", "role_changes": [{"at": 30.0, "role": "replica", "token": 0}]})  # restarted
    eras.observe({"node": "b", "role_changes": [{"at": 10.0, "role": "replica", "token": 0},
                                                {"at": 12.0, "role": "primary", "token": 6}]})
    assert eras.eras == [Era("a", 2, 0.0), Era("b", 6, 12.0)]


class Store:
    """A stand-in for the node read back at the end (a dict behind redis-py's get)."""

    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    def get(self, key: str):
        return self.data.get(key)


def test_a_lost_acknowledged_write_and_a_counter_gone_back_are_counted(tmp_path) -> None:
    worker = Worker(0, [A])
    worker.sent = {"w0:k1": [b"v0", b"v1", b"v2"], "w0:k2": [b"x0"]}
    worker.acked = {"w0:k1": 1, "w0:k2": 0}
    worker.incr_sent, worker.incr_acked = 5, 4
    ok = Store({"w0:k1": b"v2", "w0:k2": b"x0", "w0:counter": b"5"})     # v2 was sent after v1: allowed
    assert worker.verify(ok) == (3, 0, [])
    lost = Store({"w0:k1": b"v0", "w0:k2": b"x0", "w0:counter": b"3"})
    acked, missing, problems = worker.verify(lost)
    assert missing == 2 and any("w0:k1" in p for p in problems) and any("went back" in p for p in problems)
    path = tmp_path / "records.json"
    save_workers([worker], str(path))
    assert load_workers(str(path)) == [worker]
