/* XDP programs of the namespace testbed (testbed/topology.py), not of the gateway.
 *
 * testbed_decap: the remote data center's stand-in gateway. This kernel has no
 * ipip/sit/ip6tnl devices, so dc2 strips an outer IPv4 (no options, not
 * fragmented) or IPv6 header addressed to its endpoint that carries IPv4 (4) or
 * IPv6 (41); everything else goes to the stack untouched.
 *
 * testbed_pass: does nothing. A veth wakes its peer after XDP_TX only if the
 * peer has an XDP program (GRO is enough for redirects, not for XDP_TX), so the
 * router's end of the gateway uplink carries this one. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>

/* -DDC2_ENDPOINT4=0x... and DC2_ENDPOINT6_0..3: the endpoints in host order */

static __always_inline int is_endpoint6(const struct ipv6hdr *ip6)
{
    const __be32 *w = ip6->daddr.in6_u.u6_addr32;
    return w[0] == bpf_htonl(DC2_ENDPOINT6_0) && w[1] == bpf_htonl(DC2_ENDPOINT6_1) &&
           w[2] == bpf_htonl(DC2_ENDPOINT6_2) && w[3] == bpf_htonl(DC2_ENDPOINT6_3);
}

int testbed_decap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    int outer;
    __u8 inner;

    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)) ||
            ip->daddr != bpf_htonl(DC2_ENDPOINT4))
            return XDP_PASS;
        outer = sizeof(*ip);
        inner = ip->protocol;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end || !is_endpoint6(ip6))
            return XDP_PASS;
        outer = sizeof(*ip6);
        inner = ip6->nexthdr;
    } else {
        return XDP_PASS;
    }
    if (inner != IPPROTO_IPIP && inner != IPPROTO_IPV6)
        return XDP_PASS;

    struct ethhdr saved = *eth;
    if (bpf_xdp_adjust_head(ctx, outer))
        return XDP_PASS;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    __builtin_memcpy(eth->h_dest, saved.h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_source, saved.h_source, ETH_ALEN);
    eth->h_proto = bpf_htons(inner == IPPROTO_IPIP ? ETH_P_IP : ETH_P_IPV6);
    return XDP_PASS;
}

int testbed_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}
