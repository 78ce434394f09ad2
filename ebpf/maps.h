/* Every map of the XDP program but the test build's forward trace (trace.h)
 * and the capture's filter, buffers and ring (capture.h).
 * Sizes come from the config through -D flags (dataplane/program.py); their
 * defaults are in defaults.h. */
#ifndef XDPGW_MAPS_H
#define XDPGW_MAPS_H

#include "defaults.h"
#include "structs.h"

/* State that must outlive a daemon restart (flows, counters, offloads) is
 * pinned under XDPGW_PIN_DIR, which the loader sets per gateway; without it
 * (packet tests) every map is private to the loaded program. */
#ifdef XDPGW_PIN_DIR
#define STATE_TABLE(type, key, leaf, name, size, flags) \
    BPF_F_TABLE(type ":" XDPGW_PIN_DIR "/" #name, key, leaf, name, size, flags)
#else
#define STATE_TABLE(type, key, leaf, name, size, flags) BPF_F_TABLE(type, key, leaf, name, size, flags)
#endif

/* source prefix -> region id, one trie per family */
BPF_LPM_TRIE(region_prefixes_v4, struct lpm_v4_key, __u32, XDPGW_MAX_PREFIXES);
BPF_LPM_TRIE(region_prefixes_v6, struct lpm_v6_key, __u32, XDPGW_MAX_PREFIXES);
/* index 0 is the "unknown" region */
STATE_TABLE("percpu_array", __u32, struct traffic_counter, region_counters, XDPGW_MAX_REGIONS + 1, 0);

/* (VIP, port, proto) -> service; port 0 is the VIP's fragment service */
BPF_HASH(services, struct service_key, struct service_info, 2 * XDPGW_MAX_SERVICES);
/* slot of a destination address -> 1 when some VIP has that slot */
BPF_ARRAY(vip_filter, __u32, 1 << VIP_FILTER_BITS);
STATE_TABLE("percpu_array", __u32, struct service_counter, service_counters, XDPGW_MAX_SERVICES, 0);

/* One Maglev table per service, swapped whole by replacing the inner map;
 * XDPGW_MAGLEV_M slots in lines of MAGLEV_LINE_SLOTS. */
#define MAGLEV_LINES ((XDPGW_MAGLEV_M + MAGLEV_LINE_SLOTS - 1) / MAGLEV_LINE_SLOTS)
/* mmapable, so the control plane fills a new table with one memory copy */
BPF_F_TABLE("array", __u32, struct maglev_line, maglev_inner, MAGLEV_LINES, BPF_F_MMAPABLE);
BPF_ARRAY_OF_MAPS(maglev_tables, "maglev_inner", XDPGW_MAX_SERVICES);

/* 5-tuple -> VM id, one table per family, each of XDPGW_FLOW_ENTRIES (a
 * gateway may carry one family alone): IPv4 keys are 16 bytes, IPv6 keys 40.
 * LRU lists per CPU (no common LRU) so CPUs do not contend. */
STATE_TABLE("lru_hash", struct flow_key4, struct flow_entry, flow_table4, XDPGW_FLOW_ENTRIES,
            BPF_F_NO_COMMON_LRU);
STATE_TABLE("lru_hash", struct flow_key, struct flow_entry, flow_table6, XDPGW_FLOW_ENTRIES,
            BPF_F_NO_COMMON_LRU);
/* [0]: the generation of services and region prefixes (struct flow_entry);
 * pinned with the flows, so entries of an earlier daemon are never taken for current */
STATE_TABLE("array", __u32, __u32, flow_generation, 1, 0);

/* VM id -> where it is now; a live migration rewrites only this */
BPF_ARRAY(vm_location, struct vm_location, XDPGW_MAX_VMS + 1);
STATE_TABLE("percpu_array", __u32, struct traffic_counter, vm_counters, XDPGW_MAX_VMS + 1, 0);
BPF_DEVMAP(tx_ports, XDPGW_MAX_PORTS);

/* (region, service) -> another data center's tunnel endpoint */
STATE_TABLE("hash", struct offload_key, struct offload_ref, region_offload, XDPGW_MAX_REGIONS * OFFLOADS_PER_REGION, 0);
/* Offload targets by id: offloaded flows point here, so clearing a region's
 * offload sends its new flows home while its offloaded flows finish remotely. */
STATE_TABLE("array", __u32, struct offload_target, offload_endpoints, OFFLOAD_ENDPOINTS, 0);

/* Decapsulation (decap.h): this gateway's tunnel addresses -> 1, trusted outer
 * sources by family, and [0] the GUE port (sending and receiving) */
BPF_HASH(decap_addresses, struct decap_key, __u32, DECAP_ADDRESSES);
BPF_LPM_TRIE(decap_from_v4, struct lpm_v4_key, __u32, DECAP_PREFIXES);
BPF_LPM_TRIE(decap_from_v6, struct lpm_v6_key, __u32, DECAP_PREFIXES);
BPF_ARRAY(tunnel_config, struct tunnel_config, 1);

STATE_TABLE("percpu_array", __u32, __u64, stats, STAT_SLOTS, 0);
STATE_TABLE("percpu_array", __u32, __u64, drop_counters, DROP_SLOTS, 0);
BPF_PERCPU_ARRAY(flood_windows, struct flood_window, 1);

static __always_inline void stat_inc(__u32 idx)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline int drop(__u32 reason)
{
    __u64 *v = drop_counters.lookup(&reason);
    if (v)
        *v += 1;
    return XDP_DROP;
}

static __always_inline void traffic_add(struct traffic_counter *c, __u64 len)
{
    if (c) {
        c->packets += 1;
        c->bytes += len;
    }
}

#endif
