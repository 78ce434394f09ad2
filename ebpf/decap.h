/* Decapsulation: IPv4/IPv6 in IPv4/IPv6 (protocol 4 or 41) and GUE (UDP to
 * tunnel_config.gue_port) addressed to one of decap_addresses, from a source in
 * decap_from_v4/v6, are served by their inner packet. The inner headers are
 * parsed where they lie and `struct pkt` then describes the inner packet
 * (l3_off past the outer headers); the frame itself changes only when the inner
 * packet is forwarded (forward.h drops everything before l3_off). A packet the
 * gateway leaves to the kernel (XDP_PASS) therefore leaves untouched, tunnel and all.
 * A tunnel packet to a decap address is accounted to the region of its inner
 * source; one dropped before its inner headers parse is counted only by its reason. */
#ifndef XDPGW_DECAP_H
#define XDPGW_DECAP_H

#include "maps.h"
#include "parse.h"
#include "region.h"

/* GUE (draft-ietf-intarea-gue): the first two bits are the variant. Variant 1
 * is the inner IP header itself (its version nibble 4 or 6); variant 0 has a
 * 4-byte header: C bit and 5-bit hlen (both 0 here: no control messages, no
 * options), the inner protocol, 16 flag bits (0: no optional fields). */
#define GUE_VARIANT_MASK 0xc0
#define GUE_VARIANT_0 0x00
#define GUE_VARIANT_1 0x40
#define GUE_V0_HLEN 4

static __always_inline __u16 gue_port(void)
{
    __u32 zero = 0;
    struct tunnel_config *tc = tunnel_config.lookup(&zero);
    return tc ? tc->gue_port : 0;
}

/* Could this be a tunnel packet? Costs only protocol compares for TCP; UDP also
 * reads the GUE port (an inlined array lookup). Fragments of GUE carry no port
 * in all but the first, so GUE is recognised in whole datagrams only. */
static __always_inline int may_be_tunnel(const struct pkt *p)
{
    __u8 proto = p->key.proto;
    if (proto == IPPROTO_IPIP || proto == IPPROTO_IPV6)
        return 1;
    if (proto != IPPROTO_UDP || p->fragment)
        return 0;
    __u16 port = gue_port();
    return port && p->key.dport == port;
}

static __always_inline int is_decap_address(const __u8 *addr)
{
    return decap_addresses.lookup((struct decap_key *)addr) != NULL;
}

static __always_inline int trusted_source(const struct pkt *p)
{
    __u32 *hit;

    if (p->family == 4) {
        struct lpm_v4_key k4 = src_key_v4(p);
        hit = decap_from_v4.lookup(&k4);
        asm volatile("" : "+r"(hit));      /* two lookups, two call sites: see region_of() */
    } else {
        struct lpm_v6_key k6 = src_key_v6(p);
        hit = decap_from_v6.lookup(&k6);
    }
    return hit != NULL;
}

/* Where the tunnel's inner IP header starts, its family and where the tunnel's
 * payload ends (all offsets into the frame), or DECAP_DROP with the reason. */
static __always_inline int tunnel_inner(void *data, void *data_end, struct pkt *p, __u16 *inner,
                                        __u16 *end, __u8 *family)
{
    __u8 proto = p->key.proto;
    *inner = p->l4_off;
    *end = p->l3_off + p->l3_len;
    if (proto != IPPROTO_UDP) {
        *family = proto == IPPROTO_IPIP ? 4 : 6;
        return PARSE_OK;
    }
    struct udphdr *uh = pkt_at(data, p->l4_off);
    if ((void *)(uh + 1) > data_end)           /* parse_l4 checked it: for the verifier */
        return parse_fail(p, DROP_L4_TRUNC);
    *end = p->l4_off + bpf_ntohs(uh->len);     /* parse_l4: within the IP payload */
    *inner += sizeof(*uh);
    __u8 *g = pkt_at(data, *inner);
    if ((void *)(g + 1) > data_end || *inner >= *end)
        return parse_fail(p, DROP_GUE_BAD);
    __u8 variant = g[0] & GUE_VARIANT_MASK;
    if (variant == GUE_VARIANT_1) {
        __u8 version = g[0] >> 4;
        if (version != 4 && version != 6)
            return parse_fail(p, DROP_GUE_BAD);
        *family = version;
        return PARSE_OK;
    }
    if (variant != GUE_VARIANT_0 || (void *)(g + GUE_V0_HLEN) > data_end || *inner + GUE_V0_HLEN > *end)
        return parse_fail(p, DROP_GUE_BAD);
    if (g[0] || g[2] || g[3] || (g[1] != IPPROTO_IPIP && g[1] != IPPROTO_IPV6))
        return parse_fail(p, DROP_GUE_BAD);
    *family = g[1] == IPPROTO_IPIP ? 4 : 6;
    *inner += GUE_V0_HLEN;
    return PARSE_OK;
}

/* Parse the packet: Ethernet, IP, transport and, for a tunnel packet to a
 * decap address, its inner IP and transport headers, after which `p`
 * describes the inner packet. The same code parses both layers (a loop of two
 * rounds, not unrolled: the program must stay small). Returns PARSE_OK,
 * PARSE_PASS (not IP), PARSE_DROP (before any region: the outer IP header, the
 * tunnel or the inner IP header is at fault, or the tunnel is not trusted) or
 * PARSE_L4_DROP (a transport fault: account the source first). */
static __always_inline int parse_packet(void *data, void *data_end, struct pkt *p)
{
    __be16 proto = 0;

    p->len = data_end - data;
    int rc = parse_eth(data, data_end, p, &proto);
    if (rc != PARSE_OK)
        return rc;
    __u16 end = 0;                    /* the tunnel payload's end: the inner packet's limit */
#pragma nounroll
    for (int layer = 0; layer < 2; layer++) {
        rc = parse_ip(data, data_end, p, proto);
        if (rc != PARSE_OK)
            return rc;
        if (layer && p->l3_off + p->l3_len > end)   /* it must end with the tunnel, not in what follows */
            return parse_fail(p, p->family == 4 ? DROP_IP4_BAD_LEN : DROP_IP6_BAD_LEN);
        if (parse_transport(data, data_end, p) == PARSE_DROP)
            return PARSE_L4_DROP;
        if (!may_be_tunnel(p) || !is_decap_address(p->key.dst))
            break;
        if (layer)
            return parse_fail(p, DROP_DECAP_NESTED);
        if (!trusted_source(p))
            return parse_fail(p, DROP_DECAP_UNTRUSTED);
        if (p->fragment)
            return parse_fail(p, DROP_DECAP_FRAGMENT);
        __u16 inner;
        __u8 family;
        if (tunnel_inner(data, data_end, p, &inner, &end, &family) != PARSE_OK)
            return PARSE_DROP;
        proto = family == 4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
        p->eth_proto = proto;
        p->l3_off = inner;
        p->fragment = 0;
        p->first_fragment = 0;
        __builtin_memset(&p->key, 0, sizeof(p->key));
        p->decap = 1;
    }
    if (p->decap)
        stat_inc(STAT_DECAP);
    return PARSE_OK;
}

#endif
