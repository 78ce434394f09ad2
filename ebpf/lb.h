/* VM selection: flow table first, then region offload, then Maglev. */
#ifndef XDPGW_LB_H
#define XDPGW_LB_H

#include "maps.h"
#include "hash.h"
#include "parse.h"

#define FLOOD_WINDOW_NS 1000000000ull  /* XDPGW_NEW_FLOW_LIMIT counts new flows per second */

/* A VM that may carry packets: has a location and is not down. */
static __always_inline struct vm_location *usable_vm(__u32 vm_id)
{
    struct vm_location *loc = vm_location.lookup(&vm_id);
    if (!loc || !loc->kind || loc->state == VM_STATE_DOWN)
        return NULL;
    return loc;
}

static __always_inline __u32 maglev_pick(const struct flow_key *key, __u32 service_id)
{
    void *table = maglev_tables.lookup(&service_id);
    if (!table)
        return XDPGW_NO_VM;
    __u32 slot = flow_hash(key->src, key->sport, key->dport, key->proto, XDPGW_HASH_SEED) %
                 XDPGW_MAGLEV_M;
    __u32 line = slot / MAGLEV_LINE_SLOTS;
    struct maglev_line *l = bpf_map_lookup_elem(table, &line);
    return l ? l->vm[slot % MAGLEV_LINE_SLOTS] : XDPGW_NO_VM;
}

static __always_inline struct offload_target *offload_endpoint(__u32 id)
{
    struct offload_target *t = offload_endpoints.lookup(&id);
    return t && t->family ? t : NULL;
}

struct choice {
    __u32 vm_id;
    struct vm_location *loc;          /* set when a VM was chosen */
    struct offload_target *offload;   /* set when the flow goes to another DC */
    __u16 drop_reason;
};

/* The generation flow entries must carry to be current (struct flow_entry). */
static __always_inline __u32 flow_generation_now(void)
{
    __u32 zero = 0;
    __u32 *g = flow_generation.lookup(&zero);
    return g ? *g : 0;
}

/* The IPv4 table's key of an IPv4 flow (`key` holds its addresses IPv4-mapped),
 * built in registers and stored as whole words, as the table's hash loads it
 * (see ipv4_mapped). */
static __always_inline void flow_key4_of(const struct flow_key *key, struct flow_key4 *k4)
{
    __u32 src, dst;
    __builtin_memcpy(&src, key->src + IPV4_MAPPED_PREFIX, 4);
    __builtin_memcpy(&dst, key->dst + IPV4_MAPPED_PREFIX, 4);
    __u64 w[2] = {(__u64)src | (__u64)dst << 32,
                  (__u64)key->sport | (__u64)key->dport << 16 | (__u64)key->proto << 32 |
                  (__u64)key->flags << 40};
    __builtin_memcpy(k4, w, sizeof(w));
}

/* The flow's entry in its family's table, or NULL. Callers read what they need
 * at once: a pointer that may be into either table, kept live, would keep the
 * verifier from pruning the paths after it. */
static __always_inline struct flow_entry *flow_find(const struct flow_key *key, __u8 family)
{
    if (family == 4) {
        struct flow_key4 k4;
        flow_key4_of(key, &k4);
        return flow_table4.lookup(&k4);
    }
    return flow_table6.lookup((void *)key);
}

/* Choose where the flow goes, given the VM id of its flow-table entry
 * (`flow_vm`; XDPGW_NO_VM: no entry, which no entry ever holds).
 * `is_new` is set when the choice must be recorded. */
static __always_inline int choose(const struct flow_key *key, __u32 flow_vm,
                                  __u32 service_id, __u32 region, struct choice *c, int *is_new)
{
    if (flow_vm != XDPGW_NO_VM) {
        __u32 vm_id = flow_vm;
        if (vm_id & FLOW_OFFLOADED)
            c->offload = offload_endpoint(vm_id & ~FLOW_OFFLOADED);
        else
            c->loc = usable_vm(vm_id);
        if (c->loc || c->offload) {
            stat_inc(STAT_FLOW_HITS);
            c->vm_id = vm_id;
            return 0;
        }
        stat_inc(STAT_FLOW_RESELECT);
    } else {
        stat_inc(STAT_FLOW_MISSES);
    }

    struct offload_key ok = {.region_id = region, .service_id = service_id};
    struct offload_ref *ref = region_offload.lookup(&ok);
    if (ref) {
        c->offload = offload_endpoint(ref->endpoint_id);
        if (c->offload) {
            c->vm_id = FLOW_OFFLOADED | ref->endpoint_id;
            *is_new = 1;
            return 0;
        }
    }

    c->vm_id = maglev_pick(key, service_id);
    if (c->vm_id == XDPGW_NO_VM) {
        c->drop_reason = DROP_NO_VM;
        return -1;
    }
    c->loc = vm_location.lookup(&c->vm_id);
    if (!c->loc || !c->loc->kind) {
        c->drop_reason = DROP_VM_LOCATION;
        return -1;
    }
    *is_new = 1;
    return 0;
}

/* More new flows this second on this CPU than the limit: a flood (SYN flood,
 * scan). Its flows are still served, by Maglev, which is consistent, but are
 * not recorded, so they cannot push established flows out of the LRU table. */
static __always_inline int under_flood(void)
{
    if (!XDPGW_NEW_FLOW_LIMIT)
        return 0;
    __u32 zero = 0;
    struct flood_window *w = flood_windows.lookup(&zero);
    if (!w)
        return 0;
    __u64 now = bpf_ktime_get_coarse_ns();     /* a tick's precision is plenty for a one-second window */
    if (now - w->start_ns > FLOOD_WINDOW_NS) {
        w->start_ns = now;
        w->new_flows = 0;
    }
    return ++w->new_flows > XDPGW_NEW_FLOW_LIMIT;
}

static __always_inline void record_flow(const struct flow_key *key, __u8 family, __u32 vm_id,
                                        __u32 service_id, __u32 region, __u32 generation)
{
    if (under_flood()) {
        stat_inc(STAT_FLOOD_UNRECORDED);
        return;
    }
    struct flow_entry fe = {.vm_id = vm_id, .service_id = service_id, .region = region,
                            .generation = generation};
    if (family == 4) {
        struct flow_key4 k4;
        flow_key4_of(key, &k4);
        flow_table4.update(&k4, &fe);
        /* keeps clang from merging the two updates into one call through a map
         * pointer in a register, which the verifier cannot bind to one map */
        asm volatile("" ::: "memory");
    } else {
        flow_table6.update((void *)key, &fe);
    }
}

#endif
