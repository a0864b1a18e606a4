/* The paravirtual stream device: its guest ABI (mirrored by ring/stream.py; change both).
 *
 * The VMM accepts TCP connections and passes their bytes to the guest through
 * rings in guest memory; the guest writes replies into transmit rings and
 * rings a doorbell. Everything lives in the low slot at STREAM_GPA:
 *
 *   STREAM_GPA                      header page (struct stream_header)
 *   STREAM_GPA + 0x1000 + i*STRIDE  slot i: control page (struct stream_ctrl),
 *                                   then the RX ring (STREAM_RX_SIZE bytes),
 *                                   then the TX ring (STREAM_TX_SIZE bytes)
 *
 * Indices are free-running byte counters (never reset, never wrapped by the
 * writer); a byte at index n sits at ring[n % size]. Each is written by one
 * side only:
 *   host:  state, generation, rx_head (bytes written into RX), tx_tail (TX consumed)
 *   guest: guest_generation, rx_tail (RX consumed), tx_head (bytes written into TX), busy
 *
 * Connection life cycle. Every change of a slot's connection bumps
 * `generation`: the host opens a slot (generation += 1, state = 1) only when it
 * is closed and the guest has acknowledged (guest_generation == generation),
 * and closes it (state = 0, generation += 1) when the client goes away. A
 * guest that sees generation != guest_generation drops its parse state for
 * the slot, drains RX (rx_tail = rx_head), leaves tx_head as it is, and then
 * acknowledges (guest_generation = generation). The host writes RX bytes only
 * while state == 1 and the guest has acknowledged the open, and drops any TX
 * bytes left over from an older connection when it opens the slot; so the
 * indices never need resetting and a stale reply never reaches a new client.
 * A guest serves a slot only while state == 1 and guest_generation == generation.
 *
 * `busy` (guest): set before rx_tail is advanced, cleared once every request
 * taken from RX has been answered into TX. The host uses it to close a
 * half-closed connection (client EOF) only after its last reply went out.
 *
 * Ordering: x86 is TSO. Writers store the data before the index that
 * publishes it; readers load the index before the data. The guest's indices
 * are volatile so that the compiler keeps that order.
 *
 * Ports (OUT, 32 bits):
 *   STREAM_PORT_DOORBELL  value = slot: TX bytes were produced on that slot
 *   STREAM_PORT_IDLE      the guest found no work: the vCPU parks until the
 *                         device has news (input, a slot change, TX space), or
 *                         a timer (about 50 ms) lets it poll again
 */
#ifndef COLO_STREAM_H
#define COLO_STREAM_H

#include "runtime.h"

#define STREAM_GPA           0x500000UL
#define STREAM_MAGIC         0x314d52545330434cULL   /* "LC0STRM1" little-endian */
#define STREAM_VERSION       1
#define STREAM_SLOTS         32
#define STREAM_CTRL_SIZE     0x1000UL
#define STREAM_RX_SIZE       0x4000UL
#define STREAM_TX_SIZE       0x4000UL
#define STREAM_SLOT_STRIDE   (STREAM_CTRL_SIZE + STREAM_RX_SIZE + STREAM_TX_SIZE)
#define STREAM_SLOTS_GPA     (STREAM_GPA + 0x1000UL)
#define STREAM_END           (STREAM_SLOTS_GPA + STREAM_SLOTS * STREAM_SLOT_STRIDE)

#define STREAM_PORT_DOORBELL 0x30
#define STREAM_PORT_IDLE     0x31

struct stream_header {
    u64 magic;
    u64 version;
    u64 slots;
    u64 ctrl_size;
    u64 rx_size;
    u64 tx_size;
    u64 slots_gpa;
    u64 slot_stride;
};

struct stream_ctrl {
    /* written by the host */
    volatile u64 state;             /* 0 closed, 1 open */
    volatile u64 generation;        /* bumped at every open and close */
    volatile u64 rx_head;           /* RX bytes written, free-running */
    volatile u64 tx_tail;           /* TX bytes consumed, free-running */
    u64 host_reserved[4];
    /* written by the guest (its own cache line) */
    volatile u64 guest_generation;  /* the generation the guest has reset for */
    volatile u64 rx_tail;           /* RX bytes consumed */
    volatile u64 tx_head;           /* TX bytes written */
    volatile u64 busy;              /* requests taken from RX not answered into TX yet */
    u64 guest_reserved[4];
};

static inline struct stream_header *stream_header(void) { return (struct stream_header *)STREAM_GPA; }
static inline struct stream_ctrl *stream_ctrl(u64 slot) {
    return (struct stream_ctrl *)(STREAM_SLOTS_GPA + slot * STREAM_SLOT_STRIDE);
}
static inline u8 *stream_rx(u64 slot) { return (u8 *)(STREAM_SLOTS_GPA + slot * STREAM_SLOT_STRIDE + STREAM_CTRL_SIZE); }
static inline u8 *stream_tx(u64 slot) {
    return (u8 *)(STREAM_SLOTS_GPA + slot * STREAM_SLOT_STRIDE + STREAM_CTRL_SIZE + STREAM_RX_SIZE);
}
static inline void stream_doorbell(u64 slot) { outl(STREAM_PORT_DOORBELL, (u32)slot); }
static inline void stream_idle(void) { outl(STREAM_PORT_IDLE, 0); }

/* The header is valid once the device has attached. */
static inline int stream_ready(void) {
    volatile struct stream_header *h = stream_header();
    return h->magic == STREAM_MAGIC && h->version == STREAM_VERSION && h->slots == STREAM_SLOTS
        && h->rx_size == STREAM_RX_SIZE && h->tx_size == STREAM_TX_SIZE;
}

#endif
