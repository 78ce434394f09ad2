/* IPv4-mapped IPv6 addresses (::ffff:a.b.c.d): every key holds an IPv4
 * address this way, so one 16-byte shape serves both families. */
#ifndef XDPGW_ADDR_H
#define XDPGW_ADDR_H

#define IPV4_MAPPED_PREFIX 12          /* bytes before the IPv4 address: 10 zero, 2 0xff */

/* Taken by value: a pointer would make clang copy byte by byte. Written as
 * whole words, as the readers of keys load them: a load that spans several
 * narrower stores cannot be forwarded from them and waits for them to retire. */
static __always_inline void ipv4_mapped(__u8 *dst, __be32 addr)
{
    __u32 w[4] = {0, 0, bpf_htonl(0xffff), addr};
    __builtin_memcpy(dst, w, sizeof(w));
}

static __always_inline int is_ipv4_mapped(const __u8 *a)
{
    __u32 w[3];
    __builtin_memcpy(w, a, IPV4_MAPPED_PREFIX);
    return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

#endif
