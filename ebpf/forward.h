/* Forwarding by VM location: MAC rewrite + devmap redirect to a local port, or
 * IP-in-IP / GUE encapsulation out of the uplink (XDP_TX) to a remote endpoint.
 * Everything between the Ethernet header and the IP packet (l3_off) goes on the
 * way: VLAN tags (VM ports and the tunnel underlay are untagged) and, for a
 * decapsulated packet (decap.h), the tunnel's outer headers. */
#ifndef XDPGW_FORWARD_H
#define XDPGW_FORWARD_H

#include "addr.h"
#include "capture.h"
#include "decap.h"
#include "hash.h"
#include "maps.h"
#include "parse.h"
#include "trace.h"

#define OUTER_TTL 64

static __always_inline void set_macs(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
    __builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
    __builtin_memcpy(eth->h_source, src, ETH_ALEN);
}

/* Move the frame's start by `delta` bytes (positive: drop headers, negative:
 * make room) and return its Ethernet header, or NULL if that fails. */
static __always_inline struct ethhdr *reframe(struct xdp_md *ctx, int delta, void **data_end)
{
    if (delta && bpf_xdp_adjust_head(ctx, delta))
        return NULL;
    struct ethhdr *eth = (void *)(long)ctx->data;
    *data_end = (void *)(long)ctx->data_end;
    if ((void *)(eth + 1) > *data_end)
        return NULL;
    return eth;
}

static __always_inline int forward_local(struct xdp_md *ctx, struct pkt *p,
                                         const struct vm_location *loc)
{
    capture_received(ctx, p);
    void *data_end;
    struct ethhdr *eth = reframe(ctx, p->l3_off - ETH_HLEN, &data_end);
    if (!eth)
        return drop_pkt(p, DROP_ENCAP);
    eth->h_proto = p->eth_proto;
    set_macs(eth, loc->dst_mac, loc->src_mac);
    int act = tx_ports.redirect_map(loc->port_slot, XDP_DROP);
    if (act != XDP_REDIRECT)
        return drop_pkt(p, DROP_VM_LOCATION);
    return act;
}

/* One's complement sums (RFC 1071) of 16-bit words as loaded: the byte order
 * cancels out as long as every word is taken the same way. A sum is carried in
 * 64 bits and reduced to 16 at the end; minus x is ~x. */
static __always_inline __u64 csum_words(__u64 sum, const void *from, int bytes)
{
    const __u16 *w = from;

#pragma unroll
    for (int i = 0; i < bytes / 2; i++)
        sum += w[i];
    return sum;
}

static __always_inline __u16 csum_reduce(__u64 sum)
{
    sum = (sum & 0xffffffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (sum & 0xffff) + (sum >> 16);
}

static __always_inline __u16 csum_neg(__u64 sum)
{
    return ~csum_reduce(sum);
}

/* Adds the `size` bytes (a constant: the helper takes at most 512) at `off`
 * to `sum`; -1 if they are not in the frame. */
static __always_inline int csum_piece(void *data, void *data_end, __u32 off, __u32 size, __u64 *sum)
{
    void *at = pkt_at(data, off);
    if (at + size > data_end)
        return -1;
    *sum += (__u32)bpf_csum_diff(NULL, 0, at, size, 0);
    return 0;
}

/* The sum of `len` (< 4096: one page) bytes of the frame from `off` (an even
 * distance from the start of the checksummed data), or -1 if they are not all
 * in the frame. One piece per bit of `len`, largest first, each at `len` with
 * its lower bits cleared: no loop, and no offset that depends on which pieces
 * came before, so the verifier's paths through it merge. */
static __always_inline __s64 csum_bytes(void *data, void *data_end, __u32 off, __u32 len)
{
    __u64 sum = 0;
    int err = 0;

    if (len >= 4096)
        return -1;
#pragma unroll
    for (int q = 0; q < 4; q++)                 /* bit 2048: four pieces of the helper's maximum */
        if (len & 2048)
            err |= csum_piece(data, data_end, off + q * 512, 512, &sum);
#pragma unroll
    for (__u32 size = 1024; size >= 4; size /= 2) {
        __u32 at = off + (len & ~(2 * size - 1));
        if (len & size) {
            if (size == 1024)
                err |= csum_piece(data, data_end, at, 512, &sum) | csum_piece(data, data_end, at + 512, 512, &sum);
            else
                err |= csum_piece(data, data_end, at, size, &sum);
        }
    }
    __u8 *tail = pkt_at(data, off + (len & ~3u));
    if (len & 2) {
        if ((void *)(tail + 2) > data_end)
            return -1;
        sum += *(__u16 *)tail;
    }
    tail = pkt_at(data, off + (len & ~1u));
    if (len & 1) {
        if ((void *)(tail + 1) > data_end)
            return -1;
        __u8 last[2] = {tail[0], 0};             /* the odd byte, padded with a zero byte */
        sum += *(__u16 *)last;
    }
    return err ? -1 : csum_reduce(sum);
}

/* The sum of the inner IP packet (at `inner`, described by `p`) without reading
 * its payload, when its own checksums vouch for it (Katran's shortcut): a
 * complete TCP/UDP/ICMPv6 segment and its pseudo-header sum to zero, so the
 * segment sums to minus its pseudo-header; a valid IPv4 header sums to zero,
 * as does a whole ICMPv4 message. An inner packet with a wrong checksum gets a
 * wrong outer one, so it is dropped where it would have been anyway. -1 where
 * the shortcut does not hold (a fragment, IPv4 UDP without a checksum, IPv6
 * extension headers, another protocol). */
static __always_inline __s64 csum_inner_shortcut(void *data, void *data_end, __u16 inner, const struct pkt *p)
{
    __u8 proto = p->key.proto;
    __u64 pseudo_rest = bpf_htons(proto) + bpf_htons(p->l4_len);   /* the pseudo-header past its addresses */
    if (p->fragment)
        return -1;
    if (p->family == 4) {
        if (proto == IPPROTO_ICMP)
            return 0;
        if (proto == IPPROTO_UDP) {
            struct udphdr *uh = pkt_at(data, inner + (p->l4_off - p->l3_off));
            if ((void *)(uh + 1) > data_end || !uh->check)
                return -1;
        } else if (proto != IPPROTO_TCP) {
            return -1;
        }
        struct iphdr *ih = pkt_at(data, inner);
        if ((void *)(ih + 1) > data_end)
            return -1;
        return csum_neg(csum_words(pseudo_rest, &ih->saddr, 2 * sizeof(ih->saddr)));
    }
    if ((proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMPV6) ||
        p->l4_off - p->l3_off != sizeof(struct ipv6hdr))
        return -1;
    struct ipv6hdr *ih = pkt_at(data, inner);
    if ((void *)(ih + 1) > data_end)
        return -1;
    /* the header's addresses cancel the pseudo-header's: its first 8 bytes minus the rest */
    return csum_reduce(csum_words(0, ih, __builtin_offsetof(struct ipv6hdr, saddr)) + csum_neg(pseudo_rest));
}

/* GUE over IPv6: the outer UDP checksum (mandatory in IPv6) of the UDP header
 * `uh` and the inner IP packet behind it, with the pseudo-header of `o`. */
static __always_inline int gue6_checksum(void *data, void *data_end, struct ipv6hdr *o, struct udphdr *uh,
                                         const struct pkt *p)
{
    __u16 inner = (void *)(uh + 1) - data;
    __s64 body = csum_inner_shortcut(data, data_end, inner, p);
    if (body < 0)
        body = csum_bytes(data, data_end, inner, p->l3_len);
    if (body < 0)
        return -1;
    __u64 sum = csum_words(body, &o->saddr, 2 * sizeof(o->saddr)) + uh->len + bpf_htons(IPPROTO_UDP);
    sum = csum_words(sum, uh, sizeof(*uh));
    __u16 check = csum_neg(sum);
    uh->check = check ? check : 0xffff;          /* 0 would say "no checksum" */
    return 0;
}

static __always_inline void set_udp(struct udphdr *uh, const struct pkt *p)
{
    __u32 h = flow_hash(p->key.src, p->key.sport, p->key.dport, p->key.proto, XDPGW_HASH_SEED);
    uh->source = bpf_htons(GUE_SPORT_BASE | (h & GUE_SPORT_MASK));
    uh->dest = bpf_htons(gue_port());
    uh->len = bpf_htons(sizeof(*uh) + p->l3_len);
    uh->check = 0;                               /* IPv4: none (RFC 6935 allows it for tunnels) */
}

/* Wrap the IP packet in an outer IPv4 (family 4) or IPv6 header, and for GUE a
 * UDP header, and send it back out of the interface it came in on, to the next
 * hop's MAC. */
static __always_inline int tunnel_out(struct xdp_md *ctx, struct pkt *p, __u8 family, __u8 encap,
                                      const __u8 *src, const __u8 *dst, const __u8 *dmac,
                                      const __u8 *smac)
{
    capture_received(ctx, p);
    int udp = encap == ENCAP_GUE ? sizeof(struct udphdr) : 0;
    int outer = (family == 6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) + udp;
    int grow = outer - (p->l3_off - ETH_HLEN);
    __u8 next = udp ? IPPROTO_UDP : p->family == 6 ? IPPROTO_IPV6 : IPPROTO_IPIP;

    /* bytes after the IP packet (Ethernet padding) would ride in the tunnel and
     * cost MTU: drop them first (no helper call when there are none) */
    int trailing = (int)p->len - (int)(p->l3_off + p->l3_len);
    if (trailing > 0 && bpf_xdp_adjust_tail(ctx, -trailing))
        return drop_pkt(p, DROP_ENCAP);
    void *data_end;
    struct ethhdr *eth = reframe(ctx, -grow, &data_end);
    if (!eth)
        return drop_pkt(p, DROP_ENCAP);
    set_macs(eth, dmac, smac);

    if (family == 6) {
        struct ipv6hdr *o = (void *)(eth + 1);
        struct udphdr *uh = (void *)(o + 1);
        if ((void *)(uh + 1) > data_end)
            return drop_pkt(p, DROP_ENCAP);
        eth->h_proto = bpf_htons(ETH_P_IPV6);
        __builtin_memset(o, 0, sizeof(*o));
        o->version = 6;
        o->payload_len = bpf_htons(udp + p->l3_len);
        o->nexthdr = next;
        o->hop_limit = OUTER_TTL;
        __builtin_memcpy(&o->saddr, src, 16);
        __builtin_memcpy(&o->daddr, dst, 16);
        if (udp) {
            set_udp(uh, p);
            if (gue6_checksum(eth, data_end, o, uh, p))
                return drop_pkt(p, DROP_ENCAP);
        }
    } else {
        struct iphdr *o = (void *)(eth + 1);
        struct udphdr *uh = (void *)(o + 1);
        if ((void *)(uh + 1) > data_end)
            return drop_pkt(p, DROP_ENCAP);
        eth->h_proto = bpf_htons(ETH_P_IP);
        /* the header as five words in registers (as laid out in memory, byte 0
         * lowest), summed there and stored once: reading a just-written header
         * back for its checksum would wait for every narrow store in it */
        __u32 w[5] = {(4 << 4 | IP4_MIN_IHL) | (__u32)bpf_htons(sizeof(*o) + udp + p->l3_len) << 16, 0,
                      OUTER_TTL | (__u32)next << 8};
        __builtin_memcpy(&w[3], src + IPV4_MAPPED_PREFIX, 4);
        __builtin_memcpy(&w[4], dst + IPV4_MAPPED_PREFIX, 4);
        w[2] |= (__u32)csum_neg((__u64)w[0] + w[2] + w[3] + w[4]) << 16;
        __builtin_memcpy(o, w, sizeof(w));
        if (udp)
            set_udp(uh, p);
    }
    return XDP_TX;
}

#endif
