/* Source-region accounting: longest-prefix match of the source address. */
#ifndef XDPGW_REGION_H
#define XDPGW_REGION_H

#include "addr.h"
#include "maps.h"
#include "parse.h"

/* The packet's source as a host-route key of the per-family prefix tries. */
static __always_inline struct lpm_v4_key src_key_v4(const struct pkt *p)
{
    struct lpm_v4_key k = {.prefixlen = 32};
    __builtin_memcpy(k.addr, p->key.src + IPV4_MAPPED_PREFIX, 4);
    return k;
}

static __always_inline struct lpm_v6_key src_key_v6(const struct pkt *p)
{
    struct lpm_v6_key k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, p->key.src, 16);
    return k;
}

static __always_inline __u32 region_of(const struct pkt *p)
{
    __u32 *region;

    if (p->family == 4) {
        struct lpm_v4_key k4 = src_key_v4(p);
        region = region_prefixes_v4.lookup(&k4);
        /* Keeps clang from merging this lookup and the IPv6 one into a single
         * call instruction fed two maps: the verifier could then not bind the
         * call to its map and would route it through the generic
         * bpf_map_lookup_elem, an indirect (retpoline) call. Measured with
         * `python -m bench --only breakdown` (xlated calls) and per_packet. */
        asm volatile("" : "+r"(region));
    } else {
        struct lpm_v6_key k6 = src_key_v6(p);
        region = region_prefixes_v6.lookup(&k6);
    }
    return region ? *region : XDPGW_REGION_UNKNOWN;
}

static __always_inline void region_count(__u32 region, const struct pkt *p)
{
    traffic_add(region_counters.lookup(&region), p->len);
}

/* Look the source's region up, count the packet there and note it in `p`. */
static __always_inline __u32 region_account(struct pkt *p)
{
    __u32 region = region_of(p);
    region_count(region, p);
    p->region = region;
    return region;
}

#endif
