/* In-kernel traffic generator for the end-to-end benchmark, run with
 * BPF_PROG_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES) on the client's
 * veth: every repetition turns the template frame (Ethernet / IPv4, 20-byte
 * header / UDP) into the next of `flows` flows and returns XDP_TX, which the
 * kernel turns into a transmit on that veth, i.e. the frame arrives at the
 * gateway's end.
 *
 * Flow i: source port port_base + i % port_span, source address
 * src_base + cpu * cpu_stride + i / port_span: generators on different CPUs
 * send different flows, as RSS would spread them. Live frames keep the bytes a program wrote when the
 * page is recycled (only the data pointers are reset), so every field written
 * here is written absolutely, never incrementally. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

struct gen_config {
    __u32 flows;                      /* >= 1 */
    __u32 port_span;                  /* >= 1 */
    __u32 src_base;                   /* host byte order */
    __u32 port_base;
    __u32 cpu_stride;                 /* addresses between two CPUs' flows */
};

BPF_ARRAY(gen_config, struct gen_config, 1);
BPF_PERCPU_ARRAY(gen_next, __u32, 1);      /* next flow index, per CPU */
BPF_PERCPU_ARRAY(gen_sent, __u64, 1);      /* frames returned as XDP_TX, per CPU */

static __always_inline __u16 csum_ipv4(struct iphdr *iph)
{
    __u16 *w = (__u16 *)iph;
    __u32 sum = 0;

#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

int xdp_gen_rotate(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = (void *)(eth + 1);
    struct udphdr *uh = (void *)(iph + 1);
    __u32 zero = 0;

    if ((void *)(uh + 1) > data_end)
        return XDP_ABORTED;
    struct gen_config *cfg = gen_config.lookup(&zero);
    __u32 *next = gen_next.lookup(&zero);
    __u64 *sent = gen_sent.lookup(&zero);
    if (!cfg || !next || !sent || !cfg->flows || !cfg->port_span)
        return XDP_ABORTED;

    __u32 i = *next;
    if (i >= cfg->flows)
        i = 0;
    *next = i + 1;
    uh->source = bpf_htons((__u16)(cfg->port_base + i % cfg->port_span));
    uh->check = 0;
    iph->saddr = bpf_htonl(cfg->src_base + bpf_get_smp_processor_id() * cfg->cpu_stride + i / cfg->port_span);
    iph->check = 0;
    iph->check = csum_ipv4(iph);
    *sent += 1;
    return XDP_TX;
}
