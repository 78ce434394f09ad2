/* Forwarding by VM location: MAC rewrite + devmap redirect to a local port, or
 * IP-in-IP encapsulation out of the uplink (XDP_TX) to a remote endpoint.
 * VLAN tags are removed on the way: VM ports and the tunnel underlay are untagged. */
#ifndef XDPGW_FORWARD_H
#define XDPGW_FORWARD_H

#include "addr.h"
#include "capture.h"
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
    struct ethhdr *eth = reframe(ctx, p->vlan_depth * sizeof(struct vlan_tag), &data_end);
    if (!eth)
        return drop_pkt(p, DROP_ENCAP);
    eth->h_proto = p->eth_proto;
    set_macs(eth, loc->dst_mac, loc->src_mac);
    int act = tx_ports.redirect_map(loc->port_slot, XDP_DROP);
    if (act != XDP_REDIRECT)
        return drop_pkt(p, DROP_VM_LOCATION);
    return act;
}

static __always_inline __u16 ipv4_csum(const struct iphdr *iph)
{
    const __u16 *w = (const __u16 *)iph;
    __u32 sum = 0;

#pragma unroll
    for (int i = 0; i < (int)(sizeof(*iph) / 2); i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

/* Wrap the IP packet in an outer IPv4 (family 4) or IPv6 header and send it
 * back out of the interface it came in on, to the next hop's MAC. */
static __always_inline int tunnel_out(struct xdp_md *ctx, struct pkt *p, __u8 family,
                                      const __u8 *src, const __u8 *dst, const __u8 *dmac,
                                      const __u8 *smac)
{
    capture_received(ctx, p);
    int outer = family == 6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
    int grow = outer - p->vlan_depth * (int)sizeof(struct vlan_tag);
    __u8 inner_proto = p->family == 6 ? IPPROTO_IPV6 : IPPROTO_IPIP;

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
        if ((void *)(o + 1) > data_end)
            return drop_pkt(p, DROP_ENCAP);
        eth->h_proto = bpf_htons(ETH_P_IPV6);
        __builtin_memset(o, 0, sizeof(*o));
        o->version = 6;
        o->payload_len = bpf_htons(p->l3_len);
        o->nexthdr = inner_proto;
        o->hop_limit = OUTER_TTL;
        __builtin_memcpy(&o->saddr, src, 16);
        __builtin_memcpy(&o->daddr, dst, 16);
    } else {
        struct iphdr *o = (void *)(eth + 1);
        if ((void *)(o + 1) > data_end)
            return drop_pkt(p, DROP_ENCAP);
        eth->h_proto = bpf_htons(ETH_P_IP);
        __builtin_memset(o, 0, sizeof(*o));
        o->version = 4;
        o->ihl = IP4_MIN_IHL;
        o->tot_len = bpf_htons(sizeof(*o) + p->l3_len);
        o->ttl = OUTER_TTL;
        o->protocol = inner_proto;
        __builtin_memcpy(&o->saddr, src + IPV4_MAPPED_PREFIX, 4);
        __builtin_memcpy(&o->daddr, dst + IPV4_MAPPED_PREFIX, 4);
        o->check = ipv4_csum(o);
    }
    return XDP_TX;
}

#endif
