/* Flow hash for Maglev slot selection. dataplane/flowhash.py holds the same
 * function (Cython + reference) so the control plane can predict the choice:
 * murmur3-32 over six big-endian words (source address, ports, protocol). */
#ifndef XDPGW_HASH_H
#define XDPGW_HASH_H

#include "addr.h"
#include "structs.h"

static __always_inline __u32 rotl32(__u32 x, __u32 r)
{
    return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 murmur_round(__u32 h, __u32 w)
{
    w *= 0xcc9e2d51;
    w = rotl32(w, 15);
    w *= 0x1b873593;
    h ^= w;
    h = rotl32(h, 13);
    return h * 5 + 0xe6546b64;
}

static __always_inline __u32 flow_hash(const __u8 *src, __u16 sport, __u16 dport,
                                       __u8 proto, __u32 seed)
{
    __u32 h = seed;
    __u32 w;

    if (is_ipv4_mapped(src)) {
        /* its first three words are the mapped prefix: their rounds fold to a constant */
        h = murmur_round(murmur_round(murmur_round(h, 0), 0), 0xffff);
        __builtin_memcpy(&w, src + IPV4_MAPPED_PREFIX, 4);
        h = murmur_round(h, bpf_ntohl(w));
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __builtin_memcpy(&w, src + 4 * i, 4);
            h = murmur_round(h, bpf_ntohl(w));
        }
    }
    h = murmur_round(h, ((__u32)sport << 16) | dport);
    h = murmur_round(h, proto);
    h ^= 24;                          /* murmur3 mixes in the input length: six words, 24 bytes */
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

#endif
