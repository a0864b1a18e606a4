/* kvstore: a key-value store guest that speaks the Redis protocol (RESP2, and RESP3 after HELLO 3)
 * over the paravirtual stream device (ring/guest/programs/stream.h, ring/stream.py).
 *
 * One vCPU serves the connection slots the device names in its queue, and the
 * ones that still had work on the previous pass (never a poll of every slot: the
 * device has as many slots as its client limit): it acknowledges opens and
 * closes, copies RX bytes into the slot's linear input buffer, parses complete
 * requests, executes them, and appends the replies to the slot's output buffer,
 * which it pushes into the TX ring; it names the slots whose indices it changed
 * in the device's to_host queue and rings the doorbell once per pass. With
 * nothing to do it OUTs the idle port and the VMM parks the vCPU until there is.
 * It has no clock and no randomness: its state is a function of the bytes it
 * received, so a replica restored from a checkpoint continues correctly.
 *
 * Parameters (the parameter block; ring/guest/layout.py, scenarios/service.py):
 *   reserved[0]   hash table buckets (a power of two, 16 .. 2^26; 0: 65536)
 *   reserved[1]   largest request in bytes, as encoded on the wire (1 KiB .. 1 MiB; 0: 65536)
 *   report_every  a progress report (PORT_PROGRESS) every this many commands (0: never);
 *                 vcpu[0].progress counts the commands executed, vcpu[0].limit is honoured
 * A bad parameter ends the guest with done(code) after a console message.
 *
 * Requests: RESP arrays of bulk strings (*N\r\n$len\r\n...\r\n) and inline commands
 * (a line of words separated by spaces or tabs; no quoting). Commands are case-insensitive:
 *   PING [msg]  ECHO msg  SET key value [NX|XX]  GET key  DEL key...  INCR key
 *   EXISTS key...  DBSIZE  HELLO [2|3 [options ignored]]
 *   and INCRBY key n, DECR key, DECRBY key n (redis-py's incr() sends INCRBY key 1)
 * SET refuses expiry options (EX, PX, EXAT, PXAT, KEEPTTL): the store has no clock.
 * Anything else: -ERR unknown command 'name'.
 *
 * Malformed input gets "-ERR Protocol error: ..." and the store resynchronises by
 * dropping the bytes from the start of the bad request through the end of the line
 * on which the error was found (up to the next '\n', waiting for it if need be).
 * A request whose encoded size exceeds the maximum gets "-ERR request too large"
 * as soon as its size is known, and its bytes are skipped (its remaining bulk
 * strings are parsed only as far as their lengths; a line that is not a bulk
 * header ends the skipping and is parsed as a new request). Either way the
 * connection stays usable.
 *
 * Data region (slot 1, below the device's region at its top), in this order: the
 * connection table; per slot a small input and a small output buffer (SMALL_BUF
 * each); the argument vector; the buckets; then the arena. The arena holds
 * entries and the larger buffers of the connections that need them (an input
 * buffer grows up to request max + 64 for a large request, an output buffer up to
 * 2 * (request max + 1 KiB) for large replies; both go back at the connection's
 * close). Blocks are of power-of-two size classes with a free list per class (a
 * value that grows moves to a bigger block). Every connection can always be
 * answered: its small output buffer keeps ERR_ROOM bytes free before each
 * command, enough for any error, and a reply that would need a buffer the arena
 * cannot give gets "-ERR out of memory".
 */
#include "runtime.h"
#include "stream.h"

#define DEFAULT_TABLE   65536UL
#define DEFAULT_REQMAX  65536UL
#define MAX_LINE        32          /* longest *N / $N header line */
#define MAX_MULTIBULK   (1024 * 1024)
#define MIN_CLASS       5           /* 32-byte blocks */
#define MAX_CLASS       22          /* 4 MiB blocks */
#define PAGE            4096UL
#define SMALL_BUF       4096UL      /* each connection's own input and output buffers */
#define ERR_ROOM        512UL       /* output room kept before each command: any error or short reply */

enum { E_BAD_TABLE = 2, E_BAD_REQMAX = 3, E_NO_MEMORY = 4 };
enum { NEED_MORE = 0, PROGRESS = 1 };

struct conn {
    u8 *in;              /* linear input buffer, in_size bytes (at most in_cap) */
    u64 in_len, in_off;  /* bytes held / bytes already consumed from the front */
    u8 *out;             /* replies not yet in the TX ring, out_size bytes (at most out_cap) */
    u64 out_len, out_off;
    u8 *in_small, *out_small;   /* this slot's own SMALL_BUF buffers */
    u64 in_size, out_size;
    u32 in_cls, out_cls;        /* the arena class of a grown buffer; 0: the small one */
    u64 in_grow_failed;         /* the arena could not give a larger input buffer */
    u64 seen_pass;              /* the pass that last serviced this slot */
    u64 kept_pass;              /* the pass it is listed for in next_active */
    u64 tell_pending;           /* its indices changed but to_host had no room */
    u64 skip_bytes;      /* bytes of an oversized request still to drop */
    u64 skip_elems;      /* bulk strings of an oversized request still to drop */
    u64 skip_line;       /* drop up to and including the next '\n' */
    u64 parse_needed;    /* input arrived (or output space came back) since the last NEED_MORE */
    u64 resp3;
    u64 id;
};

_Static_assert(sizeof(struct conn) == 168, "scenarios/service.py CONN_BYTES mirrors sizeof(struct conn)");

struct arg { const u8 *p; u64 len; };

struct entry {
    struct entry *next;
    u64 hash;
    u32 klen, vlen;
    u32 cls, pad;
    u8 data[];           /* key, then value */
};

static struct params *P;
static struct vcpu_status *ST;
static struct conn *conns;
static u64 nslots, rx_size, tx_size;
static u32 *active, *next_active;   /* slots to service again on the next pass */
static u64 active_n, next_n, pass;
static struct arg *argv;
static u64 max_args, in_cap, out_cap, reply_max, req_max;
static struct entry **buckets;
static u64 table_mask, keys_count, connections;
static u8 *arena_top, *arena_end;
static void *free_lists[MAX_CLASS + 1];

/* --- small helpers ------------------------------------------------------- */

static inline void copy(void *d, const void *s, u64 n) {
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}
/* Stores before a published index: fast-string stores are weakly ordered among themselves. */
static inline void publish_fence(void) { __asm__ volatile("sfence" : : : "memory"); }

static inline u8 lower(u8 c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

static int is_cmd(const struct arg *a, const char *name) {
    u64 i = 0;
    for (; name[i]; i++)
        if (i >= a->len || lower(a->p[i]) != (u8)name[i]) return 0;
    return i == a->len;
}

static u64 hash_bytes(const u8 *p, u64 n) {          /* FNV-1a, then a mix */
    u64 h = 0xcbf29ce484222325ULL;
    for (u64 i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return mix64(h);
}

/* Strict decimal: optional '-', digits, no leading zeros, fits in s64 (Redis's string2ll). */
static int parse_s64(const u8 *p, u64 n, long *out) {
    if (n == 0 || n > 20) return 0;
    int neg = 0;
    u64 i = 0;
    if (p[0] == '-') { neg = 1; i = 1; if (n == 1) return 0; }
    if (p[i] == '0' && n - i > 1) return 0;
    if (neg && p[i] == '0') return 0;
    u64 v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return 0;
        u64 d = p[i] - '0';
        if (v > (0xFFFFFFFFFFFFFFFFULL - d) / 10) return 0;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > 0x8000000000000000ULL) return 0;
        *out = (long)(0 - v);
    } else {
        if (v > 0x7FFFFFFFFFFFFFFFULL) return 0;
        *out = (long)v;
    }
    return 1;
}

static u64 format_s64(long value, u8 *buf) {         /* returns the length; buf holds >= 21 bytes */
    u8 tmp[24];
    u64 n = 0, len = 0;
    u64 v = value < 0 ? 0 - (u64)value : (u64)value;
    do { tmp[n++] = '0' + v % 10; v /= 10; } while (v);
    if (value < 0) buf[len++] = '-';
    while (n) buf[len++] = tmp[--n];
    return len;
}

/* --- replies ------------------------------------------------------------- */

static void out_bytes(struct conn *k, const void *p, u64 n) {
    if (k->out_len + n > k->out_size) n = k->out_size - k->out_len;   /* never: room is checked per command */
    copy(k->out + k->out_len, p, n);
    k->out_len += n;
}
static void out_str(struct conn *k, const char *s) { u64 n = 0; while (s[n]) n++; out_bytes(k, s, n); }
static void out_crlf(struct conn *k) { out_bytes(k, "\r\n", 2); }
static void out_prefixed_int(struct conn *k, u8 prefix, long value) {
    u8 buf[32];
    buf[0] = prefix;
    u64 n = 1 + format_s64(value, buf + 1);
    buf[n++] = '\r'; buf[n++] = '\n';
    out_bytes(k, buf, n);
}
static void reply_int(struct conn *k, long value) { out_prefixed_int(k, ':', value); }
static void reply_bulk(struct conn *k, const u8 *p, u64 n) {
    out_prefixed_int(k, '$', (long)n);
    out_bytes(k, p, n);
    out_crlf(k);
}
static int ensure_out(struct conn *k, u64 need);
/* A bulk reply of any size: the output buffer grows for it, or the client hears why not. */
static void reply_bulk_checked(struct conn *k, const u8 *p, u64 n) {
    if (ensure_out(k, n + 32)) reply_bulk(k, p, n);
    else out_str(k, "-ERR out of memory\r\n");
}
static void reply_bulk_str(struct conn *k, const char *s) { u64 n = 0; while (s[n]) n++; reply_bulk(k, (const u8 *)s, n); }
static void reply_null(struct conn *k) { out_str(k, k->resp3 ? "_\r\n" : "$-1\r\n"); }
static void reply_error(struct conn *k, const char *msg) { out_str(k, msg); out_crlf(k); }

/* A name inside an error line: at most 128 bytes, without CR or LF. */
static void out_sanitized(struct conn *k, const u8 *p, u64 n) {
    if (n > 128) n = 128;
    for (u64 i = 0; i < n; i++) {
        u8 c = (p[i] == '\r' || p[i] == '\n') ? ' ' : p[i];
        out_bytes(k, &c, 1);
    }
}
static void reply_wrong_args(struct conn *k, const struct arg *name) {
    out_str(k, "-ERR wrong number of arguments for '");
    for (u64 i = 0; i < name->len && i < 128; i++) {
        u8 c = lower(name->p[i]);
        out_bytes(k, &c, 1);
    }
    out_str(k, "' command\r\n");
}

/* --- the store ----------------------------------------------------------- */

static u32 class_for(u64 bytes) {
    u32 cls = MIN_CLASS;
    while ((1UL << cls) < bytes) cls++;
    return cls;
}

static void *alloc_block(u32 cls) {
    if (cls > MAX_CLASS) return 0;
    void *b = free_lists[cls];
    if (b) {
        free_lists[cls] = *(void **)b;
    } else {
        u64 size = 1UL << cls;
        if ((u64)(arena_end - arena_top) < size) return 0;
        b = arena_top;
        arena_top += size;
    }
    return b;
}

static void free_block(void *b, u32 cls) {
    *(void **)b = free_lists[cls];
    free_lists[cls] = b;
}

static struct entry *alloc_entry(u64 klen, u64 vlen) {
    u32 cls = class_for(sizeof(struct entry) + klen + vlen);
    struct entry *e = alloc_block(cls);
    if (e) e->cls = cls;
    return e;
}

static void free_entry(struct entry *e) { free_block(e, e->cls); }

/* Output room without growing (the front is compacted first). */
static u64 out_room(struct conn *k) {
    if (k->out_off) {
        memmove(k->out, k->out + k->out_off, k->out_len - k->out_off);
        k->out_len -= k->out_off;
        k->out_off = 0;
    }
    return k->out_size - k->out_len;
}

/* Make room for `need` more output bytes: compact, then move to a larger block. 0: the arena is full. */
static int ensure_out(struct conn *k, u64 need) {
    if (k->out_size - k->out_len >= need) return 1;
    if (k->out_off) {
        memmove(k->out, k->out + k->out_off, k->out_len - k->out_off);
        k->out_len -= k->out_off;
        k->out_off = 0;
        if (k->out_size - k->out_len >= need) return 1;
    }
    u64 size = k->out_len + need;
    if (size > out_cap) return 0;                 /* never: pending output stays below reply_max */
    u32 cls = class_for(size);
    u8 *bigger = alloc_block(cls);
    if (!bigger) return 0;
    copy(bigger, k->out, k->out_len);
    if (k->out_cls) free_block(k->out, k->out_cls);
    k->out = bigger;
    k->out_size = 1UL << cls;
    k->out_cls = cls;
    return 1;
}

/* A larger input buffer for a request that does not fit yet (the front is compacted). 0: no. */
static int grow_in(struct conn *k) {
    if (k->in_size >= in_cap || k->in_grow_failed) return 0;
    u64 size = 2 * k->in_size < in_cap ? 2 * k->in_size : in_cap;
    u32 cls = class_for(size);
    u8 *bigger = alloc_block(cls);
    if (!bigger) { k->in_grow_failed = 1; return 0; }
    copy(bigger, k->in, k->in_len);
    if (k->in_cls) free_block(k->in, k->in_cls);
    k->in = bigger;
    k->in_size = size;
    k->in_cls = cls;
    return 1;
}

/* Returns the link that points at the key's entry (or at the 0 that ends its chain). */
static struct entry **find(const u8 *key, u64 klen, u64 h) {
    struct entry **link = &buckets[h & table_mask];
    for (struct entry *e = *link; e; link = &e->next, e = *link)
        if (e->hash == h && e->klen == klen && memcmp(e->data, key, klen) == 0) return link;
    return link;
}

static struct entry *lookup(const struct arg *key) {
    return *find(key->p, key->len, hash_bytes(key->p, key->len));
}

/* Set key to value; returns 0 when memory is exhausted. */
static int store(const u8 *key, u64 klen, const u8 *value, u64 vlen) {
    u64 h = hash_bytes(key, klen);
    struct entry **link = find(key, klen, h);
    struct entry *e = *link;
    if (e && class_for(sizeof(struct entry) + klen + vlen) == e->cls) {
        copy(e->data + klen, value, vlen);
        e->vlen = (u32)vlen;
        return 1;
    }
    struct entry *fresh = alloc_entry(klen, vlen);
    if (!fresh) return 0;
    fresh->hash = h;
    fresh->klen = (u32)klen;
    fresh->vlen = (u32)vlen;
    copy(fresh->data, key, klen);
    copy(fresh->data + klen, value, vlen);
    if (e) {                          /* replace in the chain */
        fresh->next = e->next;
        *link = fresh;
        free_entry(e);
    } else {
        fresh->next = buckets[h & table_mask];
        buckets[h & table_mask] = fresh;
        keys_count++;
    }
    return 1;
}

static int remove_key(const struct arg *key) {
    struct entry **link = find(key->p, key->len, hash_bytes(key->p, key->len));
    struct entry *e = *link;
    if (!e) return 0;
    *link = e->next;
    free_entry(e);
    keys_count--;
    return 1;
}

/* --- commands ------------------------------------------------------------ */

static void cmd_hello(struct conn *k, struct arg *a, u64 n) {
    long proto = k->resp3 ? 3 : 2;
    if (n >= 2) {
        if (!parse_s64(a[1].p, a[1].len, &proto)) {
            reply_error(k, "-ERR Protocol version is not an integer or out of range");
            return;
        }
        if (proto != 2 && proto != 3) {
            reply_error(k, "-NOPROTO unsupported protocol version");
            return;
        }
    }
    k->resp3 = proto == 3;
    out_str(k, k->resp3 ? "%7\r\n" : "*14\r\n");
    reply_bulk_str(k, "server");  reply_bulk_str(k, "redis");
    reply_bulk_str(k, "version"); reply_bulk_str(k, "7.0.0");
    reply_bulk_str(k, "proto");   reply_int(k, proto);
    reply_bulk_str(k, "id");      reply_int(k, (long)k->id);
    reply_bulk_str(k, "mode");    reply_bulk_str(k, "standalone");
    reply_bulk_str(k, "role");    reply_bulk_str(k, "master");
    reply_bulk_str(k, "modules"); out_str(k, "*0\r\n");
}

static void cmd_set(struct conn *k, struct arg *a, u64 n) {
    int nx = 0, xx = 0;
    for (u64 i = 3; i < n; i++) {
        if (is_cmd(&a[i], "nx")) nx = 1;
        else if (is_cmd(&a[i], "xx")) xx = 1;
        else if (is_cmd(&a[i], "ex") || is_cmd(&a[i], "px") || is_cmd(&a[i], "exat") ||
                 is_cmd(&a[i], "pxat") || is_cmd(&a[i], "keepttl")) {
            reply_error(k, "-ERR expiry is not supported by this store");
            return;
        } else {
            reply_error(k, "-ERR syntax error");
            return;
        }
    }
    if (nx && xx) { reply_error(k, "-ERR syntax error"); return; }
    if (nx || xx) {
        int exists = lookup(&a[1]) != 0;
        if ((nx && exists) || (xx && !exists)) { reply_null(k); return; }
    }
    if (!store(a[1].p, a[1].len, a[2].p, a[2].len)) {
        reply_error(k, "-ERR out of memory");
        return;
    }
    out_str(k, "+OK\r\n");
}

/* INCR / DECR / INCRBY / DECRBY: `by` is the increment (INCRBY and DECRBY parse it from a[2]). */
static void cmd_incr(struct conn *k, struct arg *a, long by) {
    struct entry *e = lookup(&a[1]);
    long value = 0;
    if (e && !parse_s64(e->data + e->klen, e->vlen, &value)) {
        reply_error(k, "-ERR value is not an integer or out of range");
        return;
    }
    if ((by > 0 && value > 0x7FFFFFFFFFFFFFFFL - by) || (by < 0 && value < (-0x7FFFFFFFFFFFFFFFL - 1) - by)) {
        reply_error(k, "-ERR increment or decrement would overflow");
        return;
    }
    value += by;
    u8 buf[24];
    u64 len = format_s64(value, buf);
    if (!store(a[1].p, a[1].len, buf, len)) {
        reply_error(k, "-ERR out of memory");
        return;
    }
    reply_int(k, value);
}

static void cmd_incrby(struct conn *k, struct arg *a, int negate) {
    long by;
    if (!parse_s64(a[2].p, a[2].len, &by) || (negate && by == -0x7FFFFFFFFFFFFFFFL - 1)) {
        reply_error(k, "-ERR value is not an integer or out of range");
        return;
    }
    cmd_incr(k, a, negate ? -by : by);
}

static void execute(struct conn *k, struct arg *a, u64 n) {
    struct arg *name = &a[0];
    if (is_cmd(name, "ping")) {
        if (n == 1) out_str(k, "+PONG\r\n");
        else if (n == 2) reply_bulk_checked(k, a[1].p, a[1].len);
        else reply_wrong_args(k, name);
    } else if (is_cmd(name, "echo")) {
        if (n == 2) reply_bulk_checked(k, a[1].p, a[1].len);
        else reply_wrong_args(k, name);
    } else if (is_cmd(name, "set")) {
        if (n >= 3) cmd_set(k, a, n);
        else reply_wrong_args(k, name);
    } else if (is_cmd(name, "get")) {
        if (n != 2) { reply_wrong_args(k, name); return; }
        struct entry *e = lookup(&a[1]);
        if (e) reply_bulk_checked(k, e->data + e->klen, e->vlen);
        else reply_null(k);
    } else if (is_cmd(name, "del")) {
        if (n < 2) { reply_wrong_args(k, name); return; }
        long removed = 0;
        for (u64 i = 1; i < n; i++) removed += remove_key(&a[i]);
        reply_int(k, removed);
    } else if (is_cmd(name, "exists")) {
        if (n < 2) { reply_wrong_args(k, name); return; }
        long found = 0;
        for (u64 i = 1; i < n; i++) found += lookup(&a[i]) != 0;
        reply_int(k, found);
    } else if (is_cmd(name, "incr") || is_cmd(name, "decr")) {
        if (n == 2) cmd_incr(k, a, is_cmd(name, "incr") ? 1 : -1);
        else reply_wrong_args(k, name);
    } else if (is_cmd(name, "incrby") || is_cmd(name, "decrby")) {
        if (n == 3) cmd_incrby(k, a, is_cmd(name, "decrby"));
        else reply_wrong_args(k, name);
    } else if (is_cmd(name, "dbsize")) {
        if (n == 1) reply_int(k, (long)keys_count);
        else reply_wrong_args(k, name);
    } else if (is_cmd(name, "hello")) {
        cmd_hello(k, a, n);
    } else {
        out_str(k, "-ERR unknown command '");
        out_sanitized(k, name->p, name->len);
        out_str(k, "'\r\n");
    }
}

/* One command answered: count it, report every report_every, wait at the host's limit. */
static void count_command(void) {
    u64 done_so_far = ST->progress + 1;
    ST->progress = done_so_far;
    if (P->report_every && done_so_far % P->report_every == 0) report_progress(done_so_far);
    if (done_so_far >= ST->limit) wait_for_limit(ST);
}

/* --- parsing --------------------------------------------------------------- */

static long find_byte(const u8 *p, u64 from, u64 n, u8 byte) {
    for (u64 i = from; i < n; i++) if (p[i] == byte) return (long)i;
    return -1;
}

static long find_crlf(const u8 *p, u64 from, u64 n) {
    for (u64 i = from; i + 1 < n; i++) if (p[i] == '\r' && p[i + 1] == '\n') return (long)i;
    return -1;
}

/* A protocol error found at offset `at` of the request: reply, then drop through the end of that line. */
static void protocol_error(struct conn *k, const u8 *buf, u64 len, u64 at, const char *what) {
    out_str(k, "-ERR Protocol error: ");
    out_str(k, what);
    out_crlf(k);
    long nl = find_byte(buf, at, len, '\n');
    if (nl >= 0) {
        k->in_off += (u64)nl + 1;
    } else {
        k->in_off += len;
        k->skip_line = 1;
    }
    count_command();
}

static void too_large(struct conn *k, u64 consume, u64 skip_bytes, u64 skip_elems, u64 skip_line) {
    reply_error(k, "-ERR request too large");
    k->in_off += consume;
    k->skip_bytes = skip_bytes;
    k->skip_elems = skip_elems;
    k->skip_line = skip_line;
    count_command();
}

static int parse_multibulk(struct conn *k, const u8 *buf, u64 len, int full) {
    long crlf = find_crlf(buf, 0, len);
    if (crlf < 0) {
        if (len > MAX_LINE) protocol_error(k, buf, len, 0, "invalid multibulk length");
        return len > MAX_LINE ? PROGRESS : NEED_MORE;
    }
    long count;
    if (!parse_s64(buf + 1, (u64)crlf - 1, &count) || count > MAX_MULTIBULK) {
        protocol_error(k, buf, len, 0, "invalid multibulk length");
        return PROGRESS;
    }
    u64 pos = (u64)crlf + 2;
    if (count <= 0) { k->in_off += pos; return PROGRESS; }       /* an empty request: no reply */
    if ((u64)count > max_args) { too_large(k, pos, 0, (u64)count, 0); return PROGRESS; }
    for (u64 i = 0; i < (u64)count; i++) {
        crlf = find_crlf(buf, pos, len);
        if (crlf < 0) {
            if (len - pos > MAX_LINE) { protocol_error(k, buf, len, pos, "invalid bulk length"); return PROGRESS; }
            if (full) { too_large(k, pos, 0, (u64)count - i, 0); return PROGRESS; }
            return NEED_MORE;
        }
        if (buf[pos] != '$') {
            static char what[] = "expected '$', got ' '";
            what[sizeof(what) - 3] = (buf[pos] >= 32 && buf[pos] < 127) ? (char)buf[pos] : '?';
            protocol_error(k, buf, len, pos, what);
            return PROGRESS;
        }
        long blen;
        if (!parse_s64(buf + pos + 1, (u64)crlf - pos - 1, &blen) || blen < 0 || blen > 512L * 1024 * 1024) {
            protocol_error(k, buf, len, pos, "invalid bulk length");
            return PROGRESS;
        }
        u64 data = (u64)crlf + 2, end = data + (u64)blen + 2;
        if (end > req_max) { too_large(k, data, (u64)blen + 2, (u64)count - i - 1, 0); return PROGRESS; }
        if (end > len) return NEED_MORE;
        if (buf[end - 2] != '\r' || buf[end - 1] != '\n') {
            protocol_error(k, buf, len, end - 2, "expected CRLF after a bulk string");
            return PROGRESS;
        }
        argv[i].p = buf + data;
        argv[i].len = (u64)blen;
        pos = end;
    }
    k->in_off += pos;
    execute(k, argv, (u64)count);
    count_command();
    return PROGRESS;
}

static int parse_inline(struct conn *k, const u8 *buf, u64 len, int full) {
    long nl = find_byte(buf, 0, len, '\n');
    if (nl < 0) {
        if (full || len > req_max) { too_large(k, len, 0, 0, 1); return PROGRESS; }
        return NEED_MORE;
    }
    if ((u64)nl + 1 > req_max) { too_large(k, (u64)nl + 1, 0, 0, 0); return PROGRESS; }
    u64 end = (u64)nl;
    if (end && buf[end - 1] == '\r') end--;
    u64 n = 0, i = 0;
    while (i < end) {
        while (i < end && (buf[i] == ' ' || buf[i] == '\t')) i++;
        if (i >= end) break;
        u64 start = i;
        while (i < end && buf[i] != ' ' && buf[i] != '\t') i++;
        if (n == max_args) { too_large(k, (u64)nl + 1, 0, 0, 0); return PROGRESS; }
        argv[n].p = buf + start;
        argv[n].len = i - start;
        n++;
    }
    k->in_off += (u64)nl + 1;
    if (n == 0) return PROGRESS;                                  /* an empty line: no reply */
    execute(k, argv, n);
    count_command();
    return PROGRESS;
}

/* Consume what can be consumed at the front of the input: returns NEED_MORE or PROGRESS. */
static int step(struct conn *k) {
    const u8 *buf = k->in + k->in_off;
    u64 len = k->in_len - k->in_off;
    int full = k->in_len == k->in_size && k->in_off == 0 && (k->in_size >= in_cap || k->in_grow_failed);
    if (k->skip_bytes) {
        u64 d = k->skip_bytes < len ? k->skip_bytes : len;
        k->in_off += d;
        k->skip_bytes -= d;
        return d ? PROGRESS : NEED_MORE;
    }
    if (k->skip_line) {
        long nl = find_byte(buf, 0, len, '\n');
        if (nl < 0) { k->in_off += len; return len ? PROGRESS : NEED_MORE; }
        k->in_off += (u64)nl + 1;
        k->skip_line = 0;
        return PROGRESS;
    }
    if (k->skip_elems) {
        long crlf = find_crlf(buf, 0, len);
        long blen;
        if (crlf < 0 && len <= MAX_LINE) return NEED_MORE;
        if (crlf >= 0 && buf[0] == '$' && parse_s64(buf + 1, (u64)crlf - 1, &blen) && blen >= 0) {
            k->skip_bytes = (u64)blen + 2;
            k->skip_elems--;
            k->in_off += (u64)crlf + 2;
        } else {
            k->skip_elems = 0;           /* not a bulk header: the client moved on; parse it as a request */
        }
        return PROGRESS;
    }
    if (len == 0) return NEED_MORE;
    if (buf[0] == '*') return parse_multibulk(k, buf, len, full);
    return parse_inline(k, buf, len, full);
}

/* --- the device ------------------------------------------------------------ */

static void reset_conn(struct conn *k) {
    if (k->in_cls) free_block(k->in, k->in_cls);
    if (k->out_cls) free_block(k->out, k->out_cls);
    k->in = k->in_small;   k->in_size = SMALL_BUF;   k->in_cls = 0;   k->in_grow_failed = 0;
    k->out = k->out_small; k->out_size = SMALL_BUF;  k->out_cls = 0;
    k->in_len = k->in_off = 0;
    k->out_len = k->out_off = 0;
    k->skip_bytes = k->skip_elems = k->skip_line = 0;
    k->parse_needed = 0;
    k->resp3 = 0;
}

/* Push buffered replies into the TX ring; returns the bytes pushed. */
static u64 flush_out(struct stream_ctrl *c, u64 slot, struct conn *k) {
    u64 pending = k->out_len - k->out_off;
    if (!pending) return 0;
    u64 head = c->tx_head, tail = c->tx_tail;
    u64 space = tx_size - (head - tail);
    u64 n = pending < space ? pending : space;
    if (!n) return 0;
    u8 *ring = stream_tx(slot);
    u64 at = head % tx_size, first = tx_size - at;
    if (first > n) first = n;
    copy(ring + at, k->out + k->out_off, first);
    copy(ring, k->out + k->out_off + first, n - first);
    publish_fence();
    c->tx_head = head + n;
    k->out_off += n;
    if (k->out_off == k->out_len) {
        k->out_off = k->out_len = 0;
    } else if (k->out_off >= k->out_size / 2) {
        memmove(k->out, k->out + k->out_off, k->out_len - k->out_off);
        k->out_len -= k->out_off;
        k->out_off = 0;
    }
    return n;
}

/* Service one slot: returns 1 if anything happened. */
static int service(u64 slot) {
    struct stream_ctrl *c = stream_ctrl(slot);
    struct conn *k = &conns[slot];
    u64 generation = c->generation;
    if (generation != c->guest_generation) {
        reset_conn(k);
        c->rx_tail = c->rx_head;
        c->busy = 0;
        if (c->state == 1) k->id = ++connections;
        c->guest_generation = generation;
        return 1;
    }
    if (c->state != 1) return 0;
    int work = 0;
    if (flush_out(c, slot, k)) { work = 1; k->parse_needed = 1; }
    /* RX -> the input buffer (compacted first, so a request always starts at in[0]) */
    if (k->in_off) {
        memmove(k->in, k->in + k->in_off, k->in_len - k->in_off);
        k->in_len -= k->in_off;
        k->in_off = 0;
    }
    u64 head = c->rx_head, tail = c->rx_tail;
    u64 n = head - tail, room = k->in_size - k->in_len;
    if (n && !room && grow_in(k)) room = k->in_size - k->in_len;
    if (n > room) n = room;
    if (n) {
        c->busy = 1;                      /* before rx_tail: the host reads them in the other order */
        const u8 *ring = stream_rx(slot);
        u64 at = tail % rx_size, first = rx_size - at;
        if (first > n) first = n;
        copy(k->in + k->in_len, ring + at, first);
        copy(k->in + k->in_len + first, ring, n - first);
        k->in_len += n;
        publish_fence();
        c->rx_tail = tail + n;
        k->parse_needed = 1;
        work = 1;
    }
    while (k->parse_needed && k->out_len - k->out_off < reply_max && out_room(k) >= ERR_ROOM) {
        if (step(k) == NEED_MORE) {
            k->parse_needed = 0;
            break;
        }
        work = 1;
    }
    if (flush_out(c, slot, k)) work = 1;
    if (c->busy && k->out_len == 0 && !k->parse_needed && c->rx_tail == c->rx_head) c->busy = 0;
    return work;
}

/* Service a slot once per pass; tell the host if its indices changed; keep it for the next pass if
 * it made progress (it may have more). Returns 1 if the host should look (the doorbell). */
static void keep(u64 slot, struct conn *k) {
    if (k->kept_pass == pass + 1 || next_n >= nslots) return;
    k->kept_pass = pass + 1;
    next_active[next_n++] = (u32)slot;
}

static int visit(u64 slot) {
    struct conn *k = &conns[slot];
    if (k->seen_pass == pass) {                 /* news that came after this pass serviced it */
        keep(slot, k);
        return 0;
    }
    k->seen_pass = pass;
    struct stream_ctrl *c = stream_ctrl(slot);
    u64 gen = c->guest_generation, rx = c->rx_tail, tx = c->tx_head, busy = c->busy;
    int work = service(slot);
    int told = 0;
    if (k->tell_pending || gen != c->guest_generation || rx != c->rx_tail || tx != c->tx_head
        || busy != c->busy) {
        told = stream_tell_host(slot);
        k->tell_pending = !told;
    }
    if (work || k->tell_pending) keep(slot, k);
    return told || k->tell_pending;             /* (no room: the doorbell makes the host look) */
}

static u64 round_up(u64 v, u64 to) { return (v + to - 1) & ~(to - 1); }

static void fail(const char *why, u32 code) {
    output_string("kvstore: ");
    output_string(why);
    output_string("\n");
    done(code);
}

static void setup(struct params *p) {
    u64 table = p->reserved[0] ? p->reserved[0] : DEFAULT_TABLE;
    u64 reqmax = p->reserved[1] ? p->reserved[1] : DEFAULT_REQMAX;
    if (table < 16 || table > (1UL << 26) || (table & (table - 1))) fail("table size must be a power of two", E_BAD_TABLE);
    if (reqmax < 1024 || reqmax > (1UL << 20)) fail("request max must be 1 KiB .. 1 MiB", E_BAD_REQMAX);
    req_max = reqmax;
    in_cap = reqmax + 64;
    reply_max = reqmax + 1024;
    out_cap = 2 * reply_max;
    max_args = reqmax / 2 + 16;
    nslots = stream_slots();
    rx_size = stream_rx_size();
    tx_size = stream_tx_size();
    u8 *at = (u8 *)p->data_gpa, *end = at + p->data_pages * PAGE;
    conns = (struct conn *)at; at += round_up(nslots * sizeof(struct conn), PAGE);
    active = (u32 *)at;        at += round_up(nslots * sizeof(u32), PAGE);
    next_active = (u32 *)at;   at += round_up(nslots * sizeof(u32), PAGE);
    for (u64 s = 0; s < nslots; s++) {
        conns[s].in_small = at;  at += SMALL_BUF;
        conns[s].out_small = at; at += SMALL_BUF;
        if (at > end) fail("data region too small for the connection buffers", E_NO_MEMORY);
        reset_conn(&conns[s]);
    }
    argv = (struct arg *)at;   at += round_up(max_args * sizeof(struct arg), PAGE);
    buckets = (struct entry **)at; at += round_up(table * sizeof(struct entry *), PAGE);
    table_mask = table - 1;
    if (at + (1UL << 20) > end) fail("data region too small for the buffers and the table", E_NO_MEMORY);
    arena_top = at;
    arena_end = end;
}

void guest_main(u64 vcpu, struct params *p) {
    if (vcpu != 0) for (;;) stream_idle();     /* one vCPU serves; others stay parked */
    P = p;
    ST = &p->vcpu[0];
    while (!stream_ready()) stream_idle();
    setup(p);                                  /* after the device: its slots, and the heap it left */
    for (;;) {
        pass++;
        u32 *todo = active;                    /* the slots that had work on the last pass */
        u64 todo_n = active_n;
        next_n = 0;                            /* visit() fills next_active, the other list */
        int told = 0;
        for (u64 i = 0; i < todo_n; i++) told |= visit(todo[i]);
        for (long slot; (slot = stream_next_news()) >= 0; ) told |= visit((u64)slot);
        active = next_active;
        active_n = next_n;
        next_active = todo;
        if (told) stream_doorbell();           /* one per pass */
        if (!active_n) stream_idle();
    }
}
