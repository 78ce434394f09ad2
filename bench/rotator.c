/* Flow rotator: lets BPF_PROG_RUN's repeat loop time many *different* flows
 * back to back, through any XDP program.
 *
 * Without live frames, repeat=R runs the program R times on one buffer that is
 * never reset (net/bpf/test_run.c): what a run writes, and where it moved the
 * frame's head, is what the next run sees. This program runs first in every
 * repetition and undoes that, then makes the frame the next flow, then
 * tail-calls the program under test (slot 0 of rot_target):
 *
 *   1. move the head back to where the original frame started (an IP-in-IP
 *      encap of the previous repetition moved it 20 or 40 bytes forward);
 *   2. write back the original frame's first ROT_HDR bytes (Ethernet, IP and
 *      the ports: whatever the previous repetition rewrote);
 *   3. write flow i's source address (4 bytes at src_off: the IPv4 address or
 *      the low word of the IPv6 one) and source port (at port_off), where
 *      i = next++ (per CPU) modulo `flows`:
 *          address = src_base + i / port_span, port = port_base + i % port_span
 *      (bench/frames.py builds the same flows and their flow-table keys).
 *
 * Its own cost (steps 1-3 + the tail call) is measured by rotating into the
 * XDP_DROP baseline the same way, and subtracted. */
#include <uapi/linux/bpf.h>

#define ROT_HDR 64

struct rot_config {
    __u32 frame_len;                  /* length of the original frame */
    __u32 flows;                      /* period of the rotation, >= 1 */
    __u32 port_span;                  /* >= 1 */
    __u32 port_base;
    __u32 src_base;                   /* host byte order */
    __u32 src_off;                    /* offset of the 4 address bytes written */
    __u32 port_off;                   /* offset of the source port */
    __u32 pad;
    __u8 hdr[ROT_HDR];                /* the original frame's first bytes */
};

BPF_ARRAY(rot_config, struct rot_config, 1);
BPF_PERCPU_ARRAY(rot_next, __u32, 1);
BPF_PROG_ARRAY(rot_target, 1);

int xdp_rotate(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct rot_config *cfg = rot_config.lookup(&zero);
    __u32 *next = rot_next.lookup(&zero);
    if (!cfg || !next || !cfg->flows || !cfg->port_span)
        return XDP_ABORTED;

    int len = ctx->data_end - ctx->data;
    int delta = len - (int)cfg->frame_len;
    if (delta && bpf_xdp_adjust_head(ctx, delta))
        return XDP_ABORTED;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + ROT_HDR > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(data, cfg->hdr, ROT_HDR);

    __u32 i = *next;
    if (i >= cfg->flows)
        i = 0;
    *next = i + 1;
    __u32 src = bpf_htonl(cfg->src_base + i / cfg->port_span);
    __u16 port = bpf_htons((__u16)(cfg->port_base + i % cfg->port_span));
    void *sp = data + (cfg->src_off & (ROT_HDR - 1));
    void *pp = data + (cfg->port_off & (ROT_HDR - 1));
    if (sp + 4 > data_end || pp + 2 > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(sp, &src, 4);
    __builtin_memcpy(pp, &port, 2);

    rot_target.call(ctx, 0);
    return XDP_ABORTED;                /* the slot was empty */
}
