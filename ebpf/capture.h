/* Packet capture at the XDP hook (`xdpgw capture`, dataplane/capture.py).
 *
 * Off unless armed: a packet then costs one array read and one test
 * (capture_armed), nothing else. Armed, a packet that matches the filter
 * (region, service, VM, verdict, drop reason; CAPTURE_ANY matches anything)
 * becomes one capture_ring record: struct capture_meta, its first snaplen bytes
 * as received and, when it was forwarded or tunnelled, as sent. One record per
 * packet keeps the two copies together whatever other CPUs submit.
 *
 * The verdict is known only at the end, after a rewrite (MAC rewrite, VLAN
 * strip, encapsulation) changed the frame in place; so forward.h calls
 * capture_received() just before its first change, when region, service and
 * VM are known: a packet that can still match is copied then, into a per-CPU
 * buffer (a copy, not a reconstruction: VLAN tags and Ethernet padding stay
 * exact). A packet that is never rewritten is copied once, at the end. */
#ifndef XDPGW_CAPTURE_H
#define XDPGW_CAPTURE_H

#include "maps.h"
#include "parse.h"

struct capture_buf {                  /* a record being built; per CPU */
    struct capture_meta meta;
    __u8 data[2 * CAPTURE_SNAPLEN_MAX];
};

BPF_ARRAY(capture_filter, struct capture_filter, 1);
BPF_PERCPU_ARRAY(capture_bufs, struct capture_buf, 1);
BPF_RINGBUF_OUTPUT(capture_ring, CAPTURE_RING_PAGES);

/* The filter when a capture is armed, else NULL: the unarmed path's only cost. */
static __always_inline const struct capture_filter *capture_armed(void)
{
    __u32 zero = 0;
    struct capture_filter *f = capture_filter.lookup(&zero);
    return f && f->armed ? f : NULL;
}

/* A drop whose reason a capture reports. */
static __always_inline int drop_pkt(struct pkt *p, __u16 reason)
{
    p->drop_reason = reason;
    return drop(reason);
}

static __always_inline int capture_selects(const struct capture_filter *f, const struct pkt *p)
{
    return (f->region == CAPTURE_ANY || f->region == p->region) &&
           (f->service == CAPTURE_ANY || f->service == p->service_id) &&
           (f->vm == CAPTURE_ANY || f->vm == p->vm_id);
}

static __always_inline __u64 frame_len(const struct xdp_md *ctx)
{
    return (long)ctx->data_end - (long)ctx->data;
}

/* Copy the frame's first min(length, snaplen) bytes to `dst`; returns how many. */
static __always_inline __u32 capture_copy(struct xdp_md *ctx, __u8 *dst, __u32 snaplen)
{
    __u64 len = frame_len(ctx);
    if (len > snaplen)
        len = snaplen;
    if (len < 1)
        return 0;
    /* keeps clang from folding the two bounds into one unsigned compare
     * (len - 1 < max) of a copy, which tells the verifier nothing about len */
    asm volatile("" : "+r"(len));
    if (len > CAPTURE_SNAPLEN_MAX)
        return 0;
    return bpf_xdp_load_bytes(ctx, 0, dst, len) ? 0 : len;
}

static __always_inline struct capture_buf *capture_buf(void)
{
    __u32 zero = 0;
    return capture_bufs.lookup(&zero);
}

/* Before the first change to the frame: keep it as received if it may match. */
static __always_inline void capture_received(struct xdp_md *ctx, struct pkt *p)
{
    const struct capture_filter *f = p->capture;
    if (!f || !capture_selects(f, p))
        return;
    struct capture_buf *b = capture_buf();
    if (!b)
        return;
    b->meta.rx_len = frame_len(ctx);
    p->capture_rx = capture_copy(ctx, b->data, f->snaplen);
}

/* At the end, with the verdict: a matching packet becomes a record. */
static __always_inline void capture_packet(struct xdp_md *ctx, const struct pkt *p, int verdict)
{
    const struct capture_filter *f = p->capture;
    if (!capture_selects(f, p) || (f->verdict != CAPTURE_ANY && f->verdict != (__u32)verdict) ||
        (f->reason != CAPTURE_ANY && (verdict != XDP_DROP || f->reason != p->drop_reason)))
        return;
    struct capture_buf *b = capture_buf();
    if (!b)
        return;
    __u32 rx = p->capture_rx, tx = 0;
    b->meta.tx_len = 0;
    if (!rx) {                        /* never rewritten: the frame is as received */
        b->meta.rx_len = frame_len(ctx);
        rx = capture_copy(ctx, b->data, f->snaplen);
        if (!rx)
            return;
    } else if (verdict == XDP_TX || verdict == XDP_REDIRECT) {
        if (rx > CAPTURE_SNAPLEN_MAX)
            return;
        b->meta.tx_len = frame_len(ctx);
        tx = capture_copy(ctx, b->data + rx, f->snaplen);
    }
    b->meta.ts_ns = bpf_ktime_get_ns();
    b->meta.ifindex = ctx->ingress_ifindex;
    b->meta.region = p->region;
    b->meta.service = p->service_id;
    b->meta.vm = p->vm_id;
    b->meta.verdict = verdict;
    b->meta.reason = verdict == XDP_DROP ? p->drop_reason : 0;
    b->meta.rx_caplen = rx;
    b->meta.tx_caplen = tx;
    __u32 size = sizeof(b->meta) + rx + tx;
    if (size > sizeof(*b) || capture_ring.ringbuf_output(b, size, 0))
        stat_inc(STAT_CAPTURE_LOST);
}

#endif
