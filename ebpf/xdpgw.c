/* xdpgw XDP program: parse (a tunnel packet to this gateway: its inner packet)
 * -> flow table (a current entry: region and service from it) else region
 * account -> service -> region offload -> Maglev; then forward by VM location;
 * a capture, when armed, sees the outcome. */
#include <uapi/linux/bpf.h>
#include "addr.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "region.h"
#include "lb.h"
#include "icmp.h"
#include "decap.h"
#include "capture.h"
#include "forward.h"

/* The one place a chosen packet leaves, so the program holds one copy of each
 * forwarding path: everything is inlined (bcc loads no BPF-to-BPF calls) and
 * every copy costs program size and verifier work. */
static __always_inline int deliver(struct xdp_md *ctx, struct pkt *p, const struct choice *c,
                                __u32 service_id)
{
    const struct offload_target *t = c->offload;
    const struct vm_location *loc = c->loc;
    __u8 family, encap;
    const __u8 *src, *dst, *dmac, *smac;
    if (t) {
        stat_inc(STAT_OFFLOAD_FWD);
        trace_forward(FWD_OFFLOAD, XDPGW_NO_VM, 0, service_id);
        family = t->family;
        encap = t->encap;
        src = t->src;
        dst = t->endpoint;
        dmac = t->next_hop_mac;
        smac = t->src_mac;
    } else {
        p->vm_id = c->vm_id;
        traffic_add(vm_counters.lookup((__u32 *)&c->vm_id), p->len);
        if (loc->kind == VM_LOC_LOCAL) {
            stat_inc(STAT_LOCAL_FWD);
            trace_forward(FWD_LOCAL, c->vm_id, loc->port_slot, service_id);
            return forward_local(ctx, p, loc);
        }
        stat_inc(STAT_TUNNEL_FWD);
        trace_forward(FWD_TUNNEL, c->vm_id, 0, service_id);
        family = loc->tunnel_family;
        encap = loc->encap;
        src = loc->tunnel_src;
        dst = loc->tunnel_dst;
        dmac = loc->dst_mac;
        smac = loc->src_mac;
    }
    return tunnel_out(ctx, p, family, encap, src, dst, dmac, smac);
}

/* The vip_filter slot of an address (dataplane/maps.py vip_slot is the same). */
static __always_inline __u32 vip_slot(const __u8 *addr)
{
    __u32 w[4];
    __builtin_memcpy(w, addr, 16);
    return ((w[0] ^ w[1] ^ w[2] ^ w[3]) * VIP_FILTER_MULT) >> (32 - VIP_FILTER_BITS);
}

/* False for most packets to no VIP: they skip the flow table and the service
 * lookup. VIPs are keyed IPv4-mapped, so an IPv6 packet to ::ffff:a.b.c.d must
 * not match the IPv4 VIP a.b.c.d (it would share that VIP's flows and services). */
static __always_inline int may_be_vip(const struct flow_key *flow, __u8 family)
{
    if (family == 6 && is_ipv4_mapped(flow->dst))
        return 0;
    __u32 slot = vip_slot(flow->dst);
    __u32 *set = vip_filter.lookup(&slot);
    return set && *set;
}

static __always_inline struct service_info *find_service(const struct flow_key *flow)
{
    struct service_key sk = {};
    __builtin_memcpy(sk.vip, flow->dst, 16);
    sk.port = flow->dport;
    sk.proto = flow->proto;
    sk.fragment = flow->flags & FLOW_F_FRAGMENT;
    return services.lookup(&sk);
}

#define CHOSEN (-1)                   /* not a verdict: deliver the packet as `struct choice` says */

/* An ICMP error goes where its flow goes; it never creates a flow entry. */
static __always_inline int icmp_error_choice(void *data, void *data_end, struct pkt *p, __u32 region,
                                             struct choice *c)
{
    struct flow_key flow = {};
    int rc = icmp_inner_flow(data, data_end, p, &flow);
    if (rc == PARSE_DROP)
        return drop(p->drop_reason);
    if (rc != ICMP_FLOW_FOUND)
        goto pass;
    struct service_info *svc = may_be_vip(&flow, p->family) ? find_service(&flow) : NULL;
    if (!svc)
        goto pass;
    p->service_id = svc->id;
    struct flow_entry *fe = flow_find(&flow, p->family);
    int is_new = 0;
    if (choose(&flow, fe ? fe->vm_id : XDPGW_NO_VM, svc->id, region, c, &is_new))
        return drop_pkt(p, c->drop_reason);
    stat_inc(STAT_ICMP_ERR_FWD);
    return CHOSEN;
pass:
    stat_inc(STAT_PASS);
    return XDP_PASS;
}

/* Flow table first: a current entry (struct flow_entry) gives the packet's
 * region and service, so a hit costs neither the LPM nor the service lookup. */
static __always_inline int flow_choice(struct pkt *p, struct choice *c)
{
    if (!may_be_vip(&p->key, p->family)) {
        region_account(p);
        stat_inc(STAT_PASS);
        return XDP_PASS;
    }
    __u32 generation = flow_generation_now();
    struct flow_entry *fe = flow_find(&p->key, p->family);
    __u32 flow_vm = fe ? fe->vm_id : XDPGW_NO_VM;
    __u32 service_id;
    if (fe && fe->generation == generation) {
        p->region = fe->region;
        region_count(p->region, p);
        service_id = fe->service_id;
    } else {
        region_account(p);
        struct service_info *svc = find_service(&p->key);
        if (!svc) {
            stat_inc(STAT_PASS);
            return XDP_PASS;
        }
        service_id = svc->id;
        if (fe) {                     /* recorded before a change: current again, same VM */
            fe->region = p->region;
            fe->service_id = service_id;
            fe->generation = generation;
        }
    }
    p->service_id = service_id;
    struct service_counter *sc = service_counters.lookup(&service_id);
    if (sc) {
        sc->packets += 1;
        sc->bytes += p->len;
    }

    int is_new = 0;
    if (choose(&p->key, flow_vm, service_id, p->region, c, &is_new))
        return drop_pkt(p, c->drop_reason);
    if (is_new) {
        record_flow(&p->key, p->family, c->vm_id, service_id, p->region, generation);
        if (sc)
            sc->new_flows += 1;
    }
    return CHOSEN;
}

static __always_inline int gateway(struct xdp_md *ctx, struct pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;

    int rc = parse_packet(data, data_end, p);
    if (rc == PARSE_PASS) {
        stat_inc(STAT_PASS);
        return XDP_PASS;
    }
    if (rc == PARSE_DROP)
        return drop(p->drop_reason);
    if (rc == PARSE_L4_DROP) {
        region_account(p);
        return drop(p->drop_reason);
    }
    struct choice c = {};
    int verdict = is_icmp_error(p) ? icmp_error_choice(data, data_end, p, region_account(p), &c)
                                   : flow_choice(p, &c);
    if (verdict != CHOSEN)
        return verdict;
    return deliver(ctx, p, &c, p->service_id);
}

int xdpgw_main(struct xdp_md *ctx)
{
    struct pkt p = {.service_id = CAPTURE_ANY, .vm_id = CAPTURE_ANY, .capture = capture_armed()};
    int verdict = gateway(ctx, &p);
    if (p.capture)
        capture_packet(ctx, &p, verdict);
    return verdict;
}
