/* Kernel map primitives, one per program, timed like xdpgw (through the flow
 * rotator, bench/rotator.c) so the breakdown can say what each map operation
 * of the packet path costs on this machine. Keys come from the rotated frame
 * (Ethernet / IPv4 with a 20-byte header / TCP), so every repetition is a
 * different key where the real path's key differs per flow:
 *
 *   prim_lru40_lookup   LRU hash, 40-byte key (IP + TCP header bytes 14..54),
 *                       per-CPU LRU lists: the shape of xdpgw's flow_table6
 *   prim_lru16_lookup   the same with a 16-byte key (bytes 26..42: addresses,
 *                       ports, sequence): the shape of xdpgw's flow_table4
 *   prim_lru40_update   insert into a full 40-byte-key LRU hash (evicts)
 *   prim_lru40_insert_free  insert into a 40-byte-key LRU hash with free entries
 *   prim_hash20_lookup  hash, 20-byte key, the same key for every flow
 *                       (VIP, port, protocol): the shape of the services map
 *   prim_trie4_lookup   LPM trie, IPv4 source: region accounting
 *   prim_percpu_inc     one per-CPU array counter increment
 * All return XDP_DROP. */
#include <uapi/linux/bpf.h>

struct key40 { __u8 b[40]; };
struct key16 { __u8 b[16]; };
struct key20 { __u8 vip[16]; __u16 port; __u8 proto; __u8 pad; };
struct lpm4 { __u32 prefixlen; __u8 addr[4]; };

#ifndef PRIM_ENTRIES
#define PRIM_ENTRIES 65536
#endif

BPF_F_TABLE("lru_hash", struct key40, __u64, lru40, PRIM_ENTRIES, BPF_F_NO_COMMON_LRU);
BPF_F_TABLE("lru_hash", struct key16, __u64, lru16, PRIM_ENTRIES, BPF_F_NO_COMMON_LRU);
BPF_F_TABLE("lru_hash", struct key40, __u64, lru40_full, PRIM_ENTRIES, BPF_F_NO_COMMON_LRU);
/* per-CPU share 512k: room for every insert one benchmark run makes on one CPU */
BPF_F_TABLE("lru_hash", struct key40, __u64, lru40_free, 1 << 20, BPF_F_NO_COMMON_LRU);
BPF_HASH(hash20, struct key20, __u64, 128);
BPF_LPM_TRIE(trie4, struct lpm4, __u32, 4096);
BPF_PERCPU_ARRAY(counter, __u64, 1);

#define FRAME_CHECK(n)                                            \
    void *data = (void *)(long)ctx->data;                         \
    void *data_end = (void *)(long)ctx->data_end;                 \
    if (data + (n) > data_end)                                    \
        return XDP_ABORTED;

int prim_lru40_lookup(struct xdp_md *ctx)
{
    FRAME_CHECK(54)
    struct key40 k;
    __builtin_memcpy(&k, data + 14, 40);
    __u64 *v = lru40.lookup(&k);
    return v ? XDP_DROP : XDP_PASS;
}

int prim_lru16_lookup(struct xdp_md *ctx)
{
    FRAME_CHECK(42)
    struct key16 k;
    __builtin_memcpy(&k, data + 26, 16);
    __u64 *v = lru16.lookup(&k);
    return v ? XDP_DROP : XDP_PASS;
}

int prim_lru40_update(struct xdp_md *ctx)
{
    FRAME_CHECK(54)
    struct key40 k;
    __u64 one = 1;
    __builtin_memcpy(&k, data + 14, 40);
    lru40_full.update(&k, &one);
    return XDP_DROP;
}

int prim_lru40_insert_free(struct xdp_md *ctx)
{
    FRAME_CHECK(54)
    struct key40 k;
    __u64 one = 1;
    __builtin_memcpy(&k, data + 14, 40);
    lru40_free.update(&k, &one);
    return XDP_DROP;
}

int prim_hash20_lookup(struct xdp_md *ctx)
{
    FRAME_CHECK(38)
    struct key20 k = {};
    k.vip[10] = 0xff;
    k.vip[11] = 0xff;
    __builtin_memcpy(&k.vip[12], data + 30, 4);
    __builtin_memcpy(&k.port, data + 36, 2);
    k.proto = 6;
    __u64 *v = hash20.lookup(&k);
    return v ? XDP_DROP : XDP_PASS;
}

int prim_trie4_lookup(struct xdp_md *ctx)
{
    FRAME_CHECK(34)
    struct lpm4 k = {.prefixlen = 32};
    __builtin_memcpy(k.addr, data + 26, 4);
    __u32 *v = trie4.lookup(&k);
    return v ? XDP_DROP : XDP_PASS;
}

int prim_percpu_inc(struct xdp_md *ctx)
{
    __u32 zero = 0;
    __u64 *v = counter.lookup(&zero);
    if (v)
        *v += 1;
    return XDP_DROP;
}
