/* IPv4-mapped IPv6 addresses (::ffff:a.b.c.d): every key holds an IPv4
 * address this way, so one 16-byte shape serves both families. */
#ifndef XDPGW_ADDR_H
#define XDPGW_ADDR_H

#define IPV4_MAPPED_PREFIX 12          /* bytes before the IPv4 address: 10 zero, 2 0xff */

/* Taken by value: a pointer would make clang copy byte by byte. */
static __always_inline void ipv4_mapped(__u8 *dst, __be32 addr)
{
    __builtin_memset(dst, 0, IPV4_MAPPED_PREFIX - 2);
    dst[IPV4_MAPPED_PREFIX - 2] = 0xff;
    dst[IPV4_MAPPED_PREFIX - 1] = 0xff;
    __builtin_memcpy(dst + IPV4_MAPPED_PREFIX, &addr, sizeof(addr));
}

static __always_inline int is_ipv4_mapped(const __u8 *a)
{
    __u32 w[3];
    __builtin_memcpy(w, a, IPV4_MAPPED_PREFIX);
    return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

#endif
