"""The stream device's checkpoint state (device_state, written natively: ring/native/stream.c) is the
JSON that json.dumps gives for the slots in use, with any field values, in the table's order."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings, strategies as st

from ring import MachineConfig, Workload
from ring.sim import SimMachine
from ring.stream import GEOMETRY, GENERATION, GUEST_GENERATION, OPEN, SLOT_FIELDS, STATE, STREAM_GPA, \
    STREAM_VERSION, WORDS_PER_SLOT, StreamDevice

U64 = st.integers(0, 2 ** 64 - 1)


def _expected(device: StreamDevice) -> dict:
    table = device._table
    in_use = (table["state"] != 0) | (table["generation"] != table["guest_generation"])
    slots = [dict({name: int(table[slot][name]) for name in SLOT_FIELDS}, slot=int(slot))
             for slot in np.flatnonzero(in_use)]
    return {"device": "stream", "version": STREAM_VERSION, "gpa": STREAM_GPA,
            "geometry": {name: getattr(device.geometry, name) for name in GEOMETRY}, "slots": slots}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["open", "unacked", "closed"]),
                          st.lists(U64, min_size=WORDS_PER_SLOT, max_size=WORDS_PER_SLOT)), max_size=8))
def test_device_state_is_the_json_of_the_slots_in_use(changes) -> None:
    with SimMachine(MachineConfig(vcpus=1, data_bytes=16 << 20), Workload("uniform")) as vm:
        device = StreamDevice("127.0.0.1", 0, slots=8)
        device.attach(vm)
        words = device._table_words
        for slot, kind, values in changes:
            words[slot] = values
            if kind == "open":
                words[slot, STATE] = OPEN
            else:
                words[slot, STATE] = 0
                words[slot, GUEST_GENERATION] = words[slot, GENERATION] ^ (1 if kind == "unacked" else 0)
        text = device.device_state()
        assert text == json.dumps(_expected(device), separators=(",", ":")).encode()
        device.close()
