/* The VM-port watcher (control/migration/watcher.py): attached to every host port a VM
 * sits behind, on the port's ingress (frames the VM sends). It never changes a
 * frame and returns XDP_PASS for everything, so the routing of VM replies is
 * unchanged. It does two things:
 *
 * - announcements: a gratuitous ARP (request or reply, sender IP == target IP),
 *   a RARP (ethertype 0x8035), or an unsolicited ICMPv6 neighbour advertisement
 *   with the override flag (what a hypervisor sends for a VM after a live
 *   migration) goes to user space as a struct vm_announce on a perf buffer;
 * - VM-to-VM traffic: bytes per (sender MAC, destination IP), per CPU, for the
 *   defragmentation planner (control/defrag/).
 *
 * No VLAN handling: host ports carry a VM's untagged frames. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_arp.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "addr.h"
#include "structs.h"

/* ICMPv6 neighbour discovery types (RFC 4861): router solicitation .. redirect */
#define ND_ROUTER_SOLICIT 133
#define ND_NEIGHBOUR_ADVERT 136
#define ND_REDIRECT 137
#define NA_FLAG_SOLICITED 0x40
#define NA_FLAG_OVERRIDE 0x20
#define IPV4_ADDR_LEN 4               /* arp_ipv4.plen for IPv4 */

BPF_PERF_OUTPUT(vm_announcements);
BPF_TABLE("lru_percpu_hash", struct vm_pair_key, struct traffic_counter, vm_pair_bytes, VMPORT_PAIR_ENTRIES);

struct arp_ipv4 {                     /* ARP/RARP for Ethernet + IPv4 */
    __be16 htype;
    __be16 ptype;
    __u8 hlen;
    __u8 plen;
    __be16 op;
    __u8 sha[ETH_ALEN];
    __u8 spa[IPV4_ADDR_LEN];
    __u8 tha[ETH_ALEN];
    __u8 tpa[IPV4_ADDR_LEN];
} __attribute__((packed));

struct na_head {                      /* ICMPv6 NA: header, flags, target */
    __u8 type;
    __u8 code;
    __be16 checksum;
    __u8 flags;
    __u8 reserved[3];
    __u8 target[16];
};

static __always_inline void announce(struct xdp_md *ctx, __u8 kind, __u8 family, const __u8 *mac, const __u8 *ip)
{
    struct vm_announce ev = {};
    ev.ts_ns = bpf_ktime_get_ns();
    ev.ifindex = ctx->ingress_ifindex;
    ev.kind = kind;
    ev.family = family;
    __builtin_memcpy(ev.mac, mac, ETH_ALEN);
    if (family == 4) {
        __be32 v4;
        __builtin_memcpy(&v4, ip, sizeof(v4));
        ipv4_mapped(ev.ip, v4);
    } else if (family == 6)
        __builtin_memcpy(ev.ip, ip, 16);
    vm_announcements.perf_submit(ctx, &ev, sizeof(ev));
}

static __always_inline void count_pair(const __u8 *src_mac, const __u8 *dst, __u64 bytes)
{
    struct vm_pair_key key = {};
    __builtin_memcpy(key.src_mac, src_mac, ETH_ALEN);
    __builtin_memcpy(key.dst, dst, 16);
    struct traffic_counter *c = vm_pair_bytes.lookup(&key);
    if (c) {
        c->packets += 1;
        c->bytes += bytes;
    } else {
        struct traffic_counter fresh = {1, bytes};
        vm_pair_bytes.update(&key, &fresh);
    }
}

int vmport_main(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __u64 len = data_end - data;

    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    __u16 proto = eth->h_proto;

    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return XDP_PASS;
        __u8 dst[16];
        ipv4_mapped(dst, ip->daddr);
        count_pair(eth->h_source, dst, len);
        return XDP_PASS;
    }
    if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return XDP_PASS;
        if (ip6->nexthdr == IPPROTO_ICMPV6) {
            struct na_head *na = (void *)(ip6 + 1);
            if ((void *)(na + 1) <= data_end && na->type == ND_NEIGHBOUR_ADVERT && na->code == 0 &&
                (na->flags & NA_FLAG_OVERRIDE) && !(na->flags & NA_FLAG_SOLICITED)) {
                announce(ctx, ANNOUNCE_NA, 6, eth->h_source, na->target);
                return XDP_PASS;
            }
            if ((void *)(na + 1) <= data_end && na->type >= ND_ROUTER_SOLICIT && na->type <= ND_REDIRECT)
                return XDP_PASS;          /* neighbour discovery is not VM-to-VM traffic */
        }
        __u8 dst[16];
        __builtin_memcpy(dst, &ip6->daddr, 16);
        count_pair(eth->h_source, dst, len);
        return XDP_PASS;
    }
    if (proto == bpf_htons(ETH_P_ARP) || proto == bpf_htons(ETH_P_RARP)) {
        struct arp_ipv4 *arp = (void *)(eth + 1);
        if ((void *)(arp + 1) > data_end || arp->htype != bpf_htons(ARPHRD_ETHER) ||
            arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != ETH_ALEN || arp->plen != IPV4_ADDR_LEN)
            return XDP_PASS;
        if (proto == bpf_htons(ETH_P_RARP)) {
            if (arp->op == bpf_htons(ARPOP_RREQUEST) || arp->op == bpf_htons(ARPOP_RREPLY))
                announce(ctx, ANNOUNCE_RARP, 0, arp->sha, arp->spa);
            return XDP_PASS;
        }
        if ((arp->op == bpf_htons(ARPOP_REQUEST) || arp->op == bpf_htons(ARPOP_REPLY)) &&
            arp->spa[0] == arp->tpa[0] && arp->spa[1] == arp->tpa[1] && arp->spa[2] == arp->tpa[2] &&
            arp->spa[3] == arp->tpa[3])
            announce(ctx, ANNOUNCE_GARP, 4, arp->sha, arp->spa);
    }
    return XDP_PASS;
}
