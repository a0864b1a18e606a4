/* The paravirtual stream device: its guest ABI, version 2 (mirrored by ring/stream.py; change both).
 *
 * The VMM accepts TCP connections and passes their bytes to the guest through
 * rings in guest memory; the guest writes replies into transmit rings. Each
 * connection has a slot; the number of slots is the device's client limit (a
 * client beyond it gets Redis's "-ERR max number of clients reached" from the
 * VMM and is closed). The header page sits at STREAM_GPA; the rest, sized by
 * the slot count, at the top of the data region (the VMM lowers
 * params.data_pages to leave it out of the program's heap):
 *
 *   ctrl_gpa       slots x struct stream_ctrl (128 bytes each)
 *   queue_gpa      two queues of queue_entries u32 slot numbers: to the guest, then to the host
 *   rings_gpa      slot i: its RX ring (rx_size bytes) at rings_gpa + i * (rx_size + tx_size),
 *                  then its TX ring (tx_size bytes)
 *
 * Indices are free-running counters (never reset, never wrapped by the writer);
 * byte n of a ring sits at ring[n % size], entry n of a queue at queue[n % entries].
 * Each is written by one side only:
 *   host:  state, generation, rx_head (bytes written into RX), tx_tail (TX consumed);
 *          to_guest_head (news entries written), to_host_tail (entries consumed)
 *   guest: guest_generation, rx_tail (RX consumed), tx_head (bytes written into TX), busy;
 *          to_guest_tail (news consumed), to_host_head (entries written)
 *
 * The queues say which slots changed, so that neither side polls every slot:
 *   - to_guest: the host appends a slot after it changed something there
 *     (RX bytes, an open, a close, TX space). A slot may appear more than once.
 *     The guest pops entries and services those slots.
 *   - to_host: the guest appends a slot after it changed one of its own
 *     indices there (an acknowledgement, RX consumed, TX produced, busy), at
 *     most once per pass over its work; it never overwrites an entry the host
 *     has not consumed (to_host_head - to_host_tail < queue_entries); with no
 *     room it keeps the slot and tries again on its next pass.
 *   Neither side decides not to append because the other side "has it
 *   already": each side's view of the other's indices may be stale.
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
 * publishes it (a slot's indices before the queue entry that names it);
 * readers load the index before the data. The indices are volatile so that
 * the compiler keeps that order; fast-string stores need an sfence first.
 *
 * Ports (OUT, 32 bits):
 *   STREAM_PORT_DOORBELL  the guest appended to to_host (TX bytes may wait)
 *   STREAM_PORT_IDLE      the guest found no work: the vCPU parks until the
 *                         device has news, or a timer (about 50 ms) lets it
 *                         poll again
 */
#ifndef COLO_STREAM_H
#define COLO_STREAM_H

#include "runtime.h"

#define STREAM_GPA           0x500000UL
#define STREAM_MAGIC         0x314d52545330434cULL   /* "LC0STRM1" little-endian */
#define STREAM_VERSION       2
#define STREAM_CTRL_SIZE     128UL

#define STREAM_PORT_DOORBELL 0x30
#define STREAM_PORT_IDLE     0x31

struct stream_header {
    /* written once by the host, before the guest starts */
    u64 magic;
    u64 version;
    u64 slots;
    u64 ctrl_gpa;
    u64 queue_gpa;
    u64 queue_entries;      /* a power of two */
    u64 rings_gpa;
    u64 rx_size;            /* powers of two */
    u64 tx_size;
    u64 region_gpa;         /* everything above, in the data region */
    u64 region_size;
    u64 reserved[21];
    /* offset 0x100: written by the host */
    volatile u64 to_guest_head;
    volatile u64 to_host_tail;
    u64 host_reserved[6];
    /* offset 0x140: written by the guest */
    volatile u64 to_guest_tail;
    volatile u64 to_host_head;
    u64 guest_reserved[6];
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
static inline u64 stream_slots(void) { return stream_header()->slots; }
static inline u64 stream_rx_size(void) { return stream_header()->rx_size; }
static inline u64 stream_tx_size(void) { return stream_header()->tx_size; }
static inline struct stream_ctrl *stream_ctrl(u64 slot) {
    return (struct stream_ctrl *)(stream_header()->ctrl_gpa + slot * STREAM_CTRL_SIZE);
}
static inline u8 *stream_rx(u64 slot) {
    struct stream_header *h = stream_header();
    return (u8 *)(h->rings_gpa + slot * (h->rx_size + h->tx_size));
}
static inline u8 *stream_tx(u64 slot) { return stream_rx(slot) + stream_header()->rx_size; }
static inline void stream_doorbell(void) { outl(STREAM_PORT_DOORBELL, 0); }
static inline void stream_idle(void) { outl(STREAM_PORT_IDLE, 0); }

/* The next slot the host has news about, or -1: pops one entry of to_guest. */
static inline long stream_next_news(void) {
    struct stream_header *h = stream_header();
    for (u64 tail = h->to_guest_tail; tail != h->to_guest_head; ) {
        u32 slot = ((volatile u32 *)h->queue_gpa)[tail & (h->queue_entries - 1)];
        h->to_guest_tail = ++tail;
        if (slot < h->slots) return (long)slot;        /* (the host never writes another) */
    }
    return -1;
}

/* Tell the host that this slot's guest indices changed: 0 if to_host has no room (try again later). */
static inline int stream_tell_host(u64 slot) {
    struct stream_header *h = stream_header();
    u64 head = h->to_host_head;
    if (head - h->to_host_tail >= h->queue_entries) return 0;
    ((volatile u32 *)h->queue_gpa)[h->queue_entries + (head & (h->queue_entries - 1))] = (u32)slot;
    h->to_host_head = head + 1;
    return 1;
}

/* The header is valid once the device has attached. */
static inline int stream_ready(void) {
    volatile struct stream_header *h = stream_header();
    return h->magic == STREAM_MAGIC && h->version == STREAM_VERSION && h->slots > 0;
}

#endif
