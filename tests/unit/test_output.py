"""Output commit: nothing leaves before its epoch is acknowledged, and order is kept."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointer.output import OutputBuffer


def test_outputs_wait_for_their_epochs_ack_and_keep_their_order() -> None:
    sent: list[tuple[str, bytes]] = []
    buffer = OutputBuffer()
    a = lambda data: sent.append(("a", data))   # noqa: E731
    b = lambda data: sent.append(("b", data))   # noqa: E731
    buffer.hold(3, a, b"one")
    buffer.hold(3, b, b"two")
    buffer.hold(4, a, b"three")
    assert buffer.release(2) == 0 and sent == []
    assert buffer.pending_since(4) and not buffer.pending_since(5)
    assert buffer.release(3) == 6
    assert sent == [("a", b"one"), ("b", b"two")]
    assert buffer.release(None) == 5 and sent[-1] == ("a", b"three")
    assert buffer.held_bytes == 0 and buffer.released_bytes == 11
    p50, p99 = buffer.latency_percentiles()
    assert 0 <= p50 <= p99


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.binary(min_size=1, max_size=4)), max_size=40),
       st.lists(st.integers(0, 30), max_size=10))
def test_release_never_sends_an_unacknowledged_epoch(items, acks) -> None:
    sent: list[tuple[int, bytes]] = []
    buffer = OutputBuffer()
    epoch, acked = 1, 0
    for step, (advance, data) in enumerate(items):
        epoch += advance                         # outputs are tagged with a non-decreasing epoch
        buffer.hold(epoch, lambda d, e=epoch: sent.append((e, d)), data)
        if step < len(acks):
            acked = max(acked, acks[step])
            buffer.release(acked)
            assert all(e <= acked for e, _ in sent)
    buffer.release(None)
    assert [d for _, d in sent] == [d for _, d in items]


def test_a_gate_that_shuts_during_a_release_stops_the_rest_until_flush() -> None:
    """The gate is checked before each output: a node stopped in the middle of a release (SIGSTOP
    past its lease) lets nothing more out when it wakes; flush() delivers the rest once it opens."""
    valid = [True]
    sent: list[bytes] = []
    buffer = OutputBuffer(gate=lambda: valid[0])

    def send_then_stop(data: bytes) -> None:
        sent.append(data)
        valid[0] = False                       # the lease runs out right after the first write

    buffer.hold(1, send_then_stop, b"one")
    buffer.hold(1, sent.append, b"")           # (empty: a close; still gated)
    buffer.hold(2, sent.append, b"two")
    assert buffer.release(2) == 3
    assert sent == [b"one"] and len(buffer) == 2
    assert buffer.flush() == 0 and sent == [b"one"]
    valid[0] = True
    assert buffer.flush() == 3
    assert sent == [b"one", b"", b"two"] and len(buffer) == 0
