/* Packet parsing: Ethernet, up to two VLAN tags, IPv4 (any IHL), IPv6 with up to
 * four extension headers, TCP/UDP/ICMP/ICMPv6. Every access is bounds-checked;
 * a malformed packet yields PARSE_DROP with its reason. */
#ifndef XDPGW_PARSE_H
#define XDPGW_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include "addr.h"
#include "structs.h"

#define PARSE_OK 0
#define PARSE_PASS 1                  /* not IP: left to the kernel untouched */
#define PARSE_DROP 2
#define PARSE_L4_DROP 3               /* dropped past a valid IP header: its source is accounted */

#define MAX_VLAN_DEPTH 2
#define MAX_IP6_EXT 4
#define IP_MF_OFFSET_MASK 0x3fff      /* MF flag | fragment offset */
#define IP_OFFSET_MASK 0x1fff         /* fragment offset alone: 0 in a first fragment */
#define IP6_FRAG_OFFSET_MASK 0xfff8   /* ip6_frag.frag_off without the M flag and reserved bits */
#define IP_WORD 4                     /* IPv4 IHL and TCP data offset count 32-bit words */
#define IP4_MIN_IHL 5                 /* words: an IPv4 header without options */
#define IP6_EXT_UNIT 8                /* IPv6 extension header length: 8-byte units, not counting the first */
#define ICMP_HDR_LEN 8                /* ICMP and ICMPv6: type, code, checksum, 4 bytes of body */
/* A frame without XDP multi-buffer fits in one page, so every valid offset is
 * below 4096; masking tells the verifier so (it then tracks packet ranges). */
#define PKT_OFF_MASK 0xfff

struct vlan_tag {
    __be16 tci;
    __be16 encap_proto;
};

struct ip6_frag {
    __u8 nexthdr;
    __u8 reserved;
    __be16 frag_off;                  /* offset << 3 | M */
    __be32 id;
};

struct pkt {
    __u32 len;                        /* frame length */
    __u16 l3_off;
    __u16 l4_off;
    __u16 l3_len;                     /* IP header + payload, from the IP header */
    __u16 l4_len;                     /* bytes after the L4 offset, from the IP header */
    __u8 family;                      /* 4 or 6 */
    __u8 vlan_depth;
    __u8 fragment;                    /* any fragment of a datagram */
    __u8 first_fragment;              /* carries the L4 header */
    __u8 icmp_type;
    __u8 icmp_code;
    __u8 decap;                       /* 1: the fields describe a tunnel's inner packet (decap.h) */
    __u8 pad;
    __u16 drop_reason;
    __be16 eth_proto;                 /* ethertype of the IP packet served (after VLAN tags, tunnel) */
    struct flow_key key;
    /* what the gateway made of the packet, for a capture (capture.h) */
    __u32 region;
    __u32 service_id;                 /* CAPTURE_ANY: no service */
    __u32 vm_id;                      /* CAPTURE_ANY: no VM */
    __u16 capture_rx;                 /* bytes copied as received before a rewrite; 0: none */
    const struct capture_filter *capture;  /* the armed filter; NULL: not capturing */
};

static __always_inline void *pkt_at(void *data, __u32 off)
{
    return data + (off & PKT_OFF_MASK);
}

static __always_inline int parse_fail(struct pkt *p, __u16 reason)
{
    p->drop_reason = reason;
    return PARSE_DROP;
}

static __always_inline int is_vlan(__be16 proto)
{
    return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* Ethernet + VLAN tags: sets l3_off and returns the L3 ethertype (network order). */
static __always_inline int parse_eth(void *data, void *data_end, struct pkt *p, __be16 *proto)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return parse_fail(p, DROP_ETH_TRUNC);
    __be16 h_proto = eth->h_proto;
    __u16 off = sizeof(*eth);

#pragma unroll
    for (int i = 0; i < MAX_VLAN_DEPTH; i++) {
        if (!is_vlan(h_proto))
            break;
        struct vlan_tag *tag = pkt_at(data, off);
        if ((void *)(tag + 1) > data_end)
            return parse_fail(p, DROP_VLAN_TRUNC);
        h_proto = tag->encap_proto;
        off += sizeof(*tag);
        p->vlan_depth++;
    }
    if (is_vlan(h_proto))
        return parse_fail(p, DROP_VLAN_TOO_DEEP);
    p->l3_off = off;
    p->eth_proto = h_proto;
    *proto = h_proto;
    return PARSE_OK;
}

static __always_inline int parse_ipv4(void *data, void *data_end, struct pkt *p)
{
    struct iphdr *iph = pkt_at(data, p->l3_off);
    if ((void *)(iph + 1) > data_end)
        return parse_fail(p, DROP_IP4_TRUNC);
    if (iph->version != 4)
        return parse_fail(p, DROP_IP4_BAD_VERSION);
    __u16 ihl = iph->ihl * IP_WORD;
    if (ihl < sizeof(*iph))
        return parse_fail(p, DROP_IP4_BAD_IHL);
    if ((void *)iph + ihl > data_end)
        return parse_fail(p, DROP_IP4_TRUNC);
    __u16 tot_len = bpf_ntohs(iph->tot_len);
    if (tot_len < ihl || (void *)iph + tot_len > data_end)
        return parse_fail(p, DROP_IP4_BAD_LEN);

    p->family = 4;
    p->l3_len = tot_len;
    p->l4_off = p->l3_off + ihl;
    p->l4_len = tot_len - ihl;
    p->key.proto = iph->protocol;
    ipv4_mapped(p->key.src, iph->saddr);
    ipv4_mapped(p->key.dst, iph->daddr);
    __u16 frag = bpf_ntohs(iph->frag_off) & IP_MF_OFFSET_MASK;
    if (frag) {
        p->fragment = 1;
        p->first_fragment = (frag & IP_OFFSET_MASK) == 0;
    }
    return PARSE_OK;
}

static __always_inline int ip6_is_ext(__u8 nh)
{
    return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
           nh == IPPROTO_FRAGMENT;
}

static __always_inline int parse_ipv6(void *data, void *data_end, struct pkt *p)
{
    struct ipv6hdr *ip6 = pkt_at(data, p->l3_off);
    if ((void *)(ip6 + 1) > data_end)
        return parse_fail(p, DROP_IP6_TRUNC);
    if (ip6->version != 6)
        return parse_fail(p, DROP_IP6_BAD_VERSION);
    __u16 payload_len = bpf_ntohs(ip6->payload_len);
    if (payload_len == 0 || (void *)(ip6 + 1) + payload_len > data_end)
        return parse_fail(p, DROP_IP6_BAD_LEN);

    p->family = 6;
    p->l3_len = sizeof(*ip6) + payload_len;
    __builtin_memcpy(p->key.src, &ip6->saddr, 16);
    __builtin_memcpy(p->key.dst, &ip6->daddr, 16);

    __u8 nh = ip6->nexthdr;
    __u16 off = p->l3_off + sizeof(*ip6);
    __u16 end = p->l3_off + p->l3_len;

#pragma unroll
    for (int i = 0; i < MAX_IP6_EXT; i++) {
        if (!ip6_is_ext(nh))
            break;
        if (nh == IPPROTO_FRAGMENT) {
            struct ip6_frag *fh = pkt_at(data, off);
            if ((void *)(fh + 1) > data_end || off + sizeof(*fh) > end)
                return parse_fail(p, DROP_IP6_EXT_TRUNC);
            p->fragment = 1;
            p->first_fragment = (bpf_ntohs(fh->frag_off) & IP6_FRAG_OFFSET_MASK) == 0;
            nh = fh->nexthdr;
            off += sizeof(*fh);
        } else {
            __u8 *eh = pkt_at(data, off);
            if ((void *)(eh + 2) > data_end)
                return parse_fail(p, DROP_IP6_EXT_TRUNC);
            __u16 elen = (eh[1] + 1) * IP6_EXT_UNIT;
            if (off + elen > end)
                return parse_fail(p, DROP_IP6_EXT_TRUNC);
            nh = eh[0];
            off += elen;
        }
    }
    if (ip6_is_ext(nh))
        return parse_fail(p, DROP_IP6_EXT_LIMIT);
    p->key.proto = nh;
    p->l4_off = off;
    p->l4_len = end - off;
    return PARSE_OK;
}

/* L4 header of a non-fragmented packet (or a first fragment): ports, ICMP type. */
static __always_inline int parse_l4(void *data, void *data_end, struct pkt *p)
{
    void *l4 = pkt_at(data, p->l4_off);
    __u8 proto = p->key.proto;

    if (proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end || p->l4_len < sizeof(*th))
            return parse_fail(p, DROP_L4_TRUNC);
        __u16 doff = th->doff * IP_WORD;
        if (doff < sizeof(*th))
            return parse_fail(p, DROP_TCP_BAD_DOFF);
        if (doff > p->l4_len)
            return parse_fail(p, DROP_L4_TRUNC);
        p->key.sport = bpf_ntohs(th->source);
        p->key.dport = bpf_ntohs(th->dest);
    } else if (proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end || p->l4_len < sizeof(*uh))
            return parse_fail(p, DROP_L4_TRUNC);
        __u16 ulen = bpf_ntohs(uh->len);
        /* a fragmented datagram's UDP length covers all of its fragments */
        if (ulen < sizeof(*uh) || (!p->fragment && ulen > p->l4_len))
            return parse_fail(p, DROP_UDP_BAD_LEN);
        p->key.sport = bpf_ntohs(uh->source);
        p->key.dport = bpf_ntohs(uh->dest);
    } else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
        __u8 *ih = l4;
        if ((void *)(ih + ICMP_HDR_LEN) > data_end || p->l4_len < ICMP_HDR_LEN)
            return parse_fail(p, DROP_L4_TRUNC);
        p->icmp_type = ih[0];
        p->icmp_code = ih[1];
    }
    return PARSE_OK;
}

/* The IP header at l3_off of ethertype `proto` (network order); PARSE_PASS if not IP. */
static __always_inline int parse_ip(void *data, void *data_end, struct pkt *p, __be16 proto)
{
    if (proto == bpf_htons(ETH_P_IP))
        return parse_ipv4(data, data_end, p);
    if (proto == bpf_htons(ETH_P_IPV6))
        return parse_ipv6(data, data_end, p);
    return PARSE_PASS;
}

/* Fragments keep ports zero so all pieces of a datagram share one key. */
static __always_inline int parse_transport(void *data, void *data_end, struct pkt *p)
{
    if (p->fragment) {
        p->key.flags = FLOW_F_FRAGMENT;
        return PARSE_OK;
    }
    return parse_l4(data, data_end, p);
}

#endif
