/* The VM-port watcher (control/portwatch.py): attached to every host port a VM
 * sits behind, on the port's ingress (frames the VM sends). It never changes a
 * frame and returns XDP_PASS for everything, so the routing of VM replies is
 * unchanged. It does two things:
 *
 * - announcements: a gratuitous ARP (request or reply, sender IP == target IP),
 *   a RARP (ethertype 0x8035), or an unsolicited ICMPv6 neighbour advertisement
 *   with the override flag (what a hypervisor sends for a VM after a live
 *   migration) goes to user space as a struct vm_announce on a perf buffer;
 * - VM-to-VM traffic: bytes per (sender MAC, destination IP), per CPU, for the
 *   defragmentation planner (control/defrag.py).
 *
 * No VLAN handling: host ports carry a VM's untagged frames. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "structs.h"

#define ETH_P_RARP_ 0x8035
#define ARPOP_REQUEST_ 1
#define ARPOP_REPLY_ 2
#define ARPOP_RREQUEST_ 3
#define ARPOP_RREPLY_ 4
#define ICMPV6_NA 136
#define NA_FLAG_SOLICITED 0x40
#define NA_FLAG_OVERRIDE 0x20

BPF_PERF_OUTPUT(vm_announcements);
BPF_TABLE("lru_percpu_hash", struct vm_pair_key, struct traffic_counter, vm_pair_bytes, VMPORT_PAIR_ENTRIES);

struct arp_ipv4 {                     /* ARP/RARP for Ethernet + IPv4 */
    __be16 htype;
    __be16 ptype;
    __u8 hlen;
    __u8 plen;
    __be16 op;
    __u8 sha[6];
    __u8 spa[4];
    __u8 tha[6];
    __u8 tpa[4];
} __attribute__((packed));

struct na_head {                      /* ICMPv6 NA: header, flags, target */
    __u8 type;
    __u8 code;
    __be16 checksum;
    __u8 flags;
    __u8 reserved[3];
    __u8 target[16];
};

static __always_inline void mapped4(__u8 *dst, const __u8 *v4)
{
    __builtin_memset(dst, 0, 10);
    dst[10] = 0xff;
    dst[11] = 0xff;
    dst[12] = v4[0];
    dst[13] = v4[1];
    dst[14] = v4[2];
    dst[15] = v4[3];
}

static __always_inline void announce(struct xdp_md *ctx, __u8 kind, __u8 family, const __u8 *mac, const __u8 *ip)
{
    struct vm_announce ev = {};
    ev.ts_ns = bpf_ktime_get_ns();
    ev.ifindex = ctx->ingress_ifindex;
    ev.kind = kind;
    ev.family = family;
    __builtin_memcpy(ev.mac, mac, 6);
    if (family == 4)
        mapped4(ev.ip, ip);
    else if (family == 6)
        __builtin_memcpy(ev.ip, ip, 16);
    vm_announcements.perf_submit(ctx, &ev, sizeof(ev));
}

static __always_inline void count_pair(const __u8 *src_mac, const __u8 *dst, __u64 bytes)
{
    struct vm_pair_key key = {};
    __builtin_memcpy(key.src_mac, src_mac, 6);
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
        mapped4(dst, (const __u8 *)&ip->daddr);
        count_pair(eth->h_source, dst, len);
        return XDP_PASS;
    }
    if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return XDP_PASS;
        if (ip6->nexthdr == IPPROTO_ICMPV6) {
            struct na_head *na = (void *)(ip6 + 1);
            if ((void *)(na + 1) <= data_end && na->type == ICMPV6_NA && na->code == 0 &&
                (na->flags & NA_FLAG_OVERRIDE) && !(na->flags & NA_FLAG_SOLICITED)) {
                announce(ctx, ANNOUNCE_NA, 6, eth->h_source, na->target);
                return XDP_PASS;
            }
            if ((void *)(na + 1) <= data_end && na->type >= 133 && na->type <= 137)
                return XDP_PASS;          /* neighbour discovery is not VM-to-VM traffic */
        }
        __u8 dst[16];
        __builtin_memcpy(dst, &ip6->daddr, 16);
        count_pair(eth->h_source, dst, len);
        return XDP_PASS;
    }
    if (proto == bpf_htons(ETH_P_ARP) || proto == bpf_htons(ETH_P_RARP_)) {
        struct arp_ipv4 *arp = (void *)(eth + 1);
        if ((void *)(arp + 1) > data_end || arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) ||
            arp->hlen != 6 || arp->plen != 4)
            return XDP_PASS;
        if (proto == bpf_htons(ETH_P_RARP_)) {
            if (arp->op == bpf_htons(ARPOP_RREQUEST_) || arp->op == bpf_htons(ARPOP_RREPLY_))
                announce(ctx, ANNOUNCE_RARP, 0, arp->sha, arp->spa);
            return XDP_PASS;
        }
        if ((arp->op == bpf_htons(ARPOP_REQUEST_) || arp->op == bpf_htons(ARPOP_REPLY_)) &&
            arp->spa[0] == arp->tpa[0] && arp->spa[1] == arp->tpa[1] && arp->spa[2] == arp->tpa[2] &&
            arp->spa[3] == arp->tpa[3])
            announce(ctx, ANNOUNCE_GARP, 4, arp->sha, arp->spa);
    }
    return XDP_PASS;
}
