/* Baseline XDP programs for the benchmarks. They share no code with ebpf/:
 * each is the least a program must do to play its part, so that every xdpgw
 * figure can be given as a ratio to one of them, measured in the same run.
 *
 *   xdp_drop_min       return XDP_DROP: the cost of running any XDP program at all
 *   xdp_redirect_min   MAC rewrite (from an array map) + devmap redirect to one slot:
 *                      the least a gateway forwarding to a local VM port does
 *   xdp_redirect_spread  the same, spreading flows over BENCH_TARGETS slots by the
 *                      UDP/TCP source port of an IPv4 frame with a 20-byte IP header
 *                      (fixed offsets): the minimal gateway of the end-to-end test
 *   xdp_sink           a VM: count the frame per destination MAC (last byte) and drop it
 *
 * Compiled by bcc (bench/programs.py) with -DBENCH_TARGETS=k. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>

#ifndef BENCH_TARGETS
#define BENCH_TARGETS 1
#endif

struct fwd_target {
    __u8 dst_mac[6];
    __u8 src_mac[6];
};

struct sink_counter {
    __u64 packets;
    __u64 bytes;
};

BPF_ARRAY(fwd_targets, struct fwd_target, BENCH_TARGETS);
BPF_DEVMAP(fwd_ports, BENCH_TARGETS);
BPF_PERCPU_ARRAY(sink_counters, struct sink_counter, 256);

int xdp_drop_min(struct xdp_md *ctx)
{
    return XDP_DROP;
}

static __always_inline int rewrite_and_redirect(struct ethhdr *eth, __u32 slot)
{
    struct fwd_target *t = fwd_targets.lookup(&slot);
    if (!t)
        return XDP_DROP;
    __builtin_memcpy(eth->h_dest, t->dst_mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, t->src_mac, ETH_ALEN);
    return fwd_ports.redirect_map(slot, XDP_DROP);
}

int xdp_redirect_min(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    return rewrite_and_redirect(eth, 0);
}

int xdp_redirect_spread(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = (void *)(eth + 1);
    __u16 *ports = (void *)(iph + 1);

    if ((void *)(ports + 2) > data_end)
        return XDP_DROP;
    __u32 slot = 0;
    if (eth->h_proto == bpf_htons(ETH_P_IP) && iph->ihl == 5 &&
        (iph->protocol == IPPROTO_UDP || iph->protocol == IPPROTO_TCP))
        slot = bpf_ntohs(ports[0]) % BENCH_TARGETS;
    return rewrite_and_redirect(eth, slot);
}

int xdp_sink(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    __u32 idx = eth->h_dest[5];
    struct sink_counter *c = sink_counters.lookup(&idx);
    if (c) {
        c->packets += 1;
        c->bytes += data_end - data;
    }
    return XDP_DROP;
}
