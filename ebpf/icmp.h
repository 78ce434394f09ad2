/* ICMP errors about a VIP flow (IPv4 unreachable incl. fragmentation needed,
 * IPv6 unreachable and packet too big) quote the VIP's reply; the error must
 * reach the VM that owns the original flow, which is the quote reversed. */
#ifndef XDPGW_ICMP_H
#define XDPGW_ICMP_H

#include "parse.h"

#define ICMP_NOT_ERROR 0
#define ICMP_FLOW_FOUND 1

static __always_inline int is_icmp_error(const struct pkt *p)
{
    if (p->fragment)
        return 0;
    /* ICMP only in IPv4, ICMPv6 only in IPv6: ICMPv6 carried by IPv4 would
     * otherwise steer the packet to the owner of an IPv6 flow */
    if (p->key.proto == IPPROTO_ICMP && p->family == 4)
        return p->icmp_type == ICMP_DEST_UNREACH;
    if (p->key.proto == IPPROTO_ICMPV6 && p->family == 6)
        return p->icmp_type == ICMPV6_DEST_UNREACH || p->icmp_type == ICMPV6_PKT_TOOBIG;
    return 0;
}

/* Fill `flow` with the original client->VIP flow quoted by the error.
 * Returns ICMP_FLOW_FOUND, ICMP_NOT_ERROR when the quote is not TCP/UDP
 * (not a VIP flow), or PARSE_DROP with the reason set. */
static __always_inline int icmp_inner_flow(void *data, void *data_end, struct pkt *p,
                                           struct flow_key *flow)
{
    __u16 off = p->l4_off + ICMP_HDR_LEN;
    __u16 end = p->l3_off + p->l3_len; /* the quote ends with the IP packet, not the frame */
    __u8 proto;

    if (p->key.proto == IPPROTO_ICMP) {
        struct iphdr *in = pkt_at(data, off);
        if ((void *)(in + 1) > data_end || off + sizeof(*in) > end || in->version != 4 || in->ihl < IP4_MIN_IHL)
            return parse_fail(p, DROP_ICMP_INNER_BAD);
        __u16 ihl = in->ihl * IP_WORD;
        proto = in->protocol;
        /* the quote is the VIP's reply: its source is the VIP, its destination the client */
        ipv4_mapped(flow->src, in->daddr);
        ipv4_mapped(flow->dst, in->saddr);
        if (bpf_ntohs(in->frag_off) & IP_MF_OFFSET_MASK) {
            flow->flags = FLOW_F_FRAGMENT;
            flow->proto = proto;
            return (proto == IPPROTO_TCP || proto == IPPROTO_UDP) ? ICMP_FLOW_FOUND
                                                                  : ICMP_NOT_ERROR;
        }
        off += ihl;
    } else {
        struct ipv6hdr *in6 = pkt_at(data, off);
        if ((void *)(in6 + 1) > data_end || off + sizeof(*in6) > end || in6->version != 6)
            return parse_fail(p, DROP_ICMP_INNER_BAD);
        proto = in6->nexthdr;
        __builtin_memcpy(flow->src, &in6->daddr, 16);
        __builtin_memcpy(flow->dst, &in6->saddr, 16);
        off += sizeof(*in6);
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return ICMP_NOT_ERROR;
    __be16 *ports = pkt_at(data, off);       /* the quote carries at least 8 L4 bytes */
    if ((void *)(ports + 2) > data_end || off + 4 > end)
        return parse_fail(p, DROP_ICMP_INNER_BAD);
    flow->proto = proto;
    flow->sport = bpf_ntohs(ports[1]);
    flow->dport = bpf_ntohs(ports[0]);
    return ICMP_FLOW_FOUND;
}

#endif
