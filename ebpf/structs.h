/* The one definition of every struct shared between the XDP program and the
 * control plane. dataplane/structs.py mirrors it; tests/xdp/test_structs.py
 * checks that sizes, offsets and constants agree. Addresses are 16 bytes for
 * both families: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d, addr.h) so one
 * key shape serves both. */
#ifndef XDPGW_STRUCTS_H
#define XDPGW_STRUCTS_H

#define XDPGW_NO_VM 0xffffffffu       /* Maglev slot / flow value with no VM */
#define XDPGW_REGION_UNKNOWN 0        /* region id of unmatched sources */

/* vm_location.kind */
#define VM_LOC_LOCAL 1                /* behind a host port: MAC rewrite + devmap */
#define VM_LOC_TUNNEL 2               /* behind a remote endpoint: IP-in-IP or GUE */

/* vm_location.encap, offload_target.encap: how a tunnel endpoint is reached */
#define ENCAP_IPIP 0                  /* IPv4/IPv6 in IPv4/IPv6 (protocol 4 or 41) */
#define ENCAP_GUE 1                   /* GUE variant 1 (UDP, then the inner IP header) to tunnel_config.gue_port */
/* GUE's outer UDP source port: GUE_SPORT_BASE | (flow hash & GUE_SPORT_MASK), in
 * the dynamic range (RFC 8086 advises it for UDP tunnels), so a receiving NIC
 * spreads one tunnel's flows over its queues and keeps each flow on one */
#define GUE_SPORT_BASE 0xc000
#define GUE_SPORT_MASK 0x3fff

/* vm_location.state: only ACTIVE VMs take new flows; DRAINING keeps its flows;
 * DOWN flows are re-selected on their next packet. */
#define VM_STATE_ACTIVE 0
#define VM_STATE_DRAINING 1
#define VM_STATE_DOWN 2

/* flow_entry.vm_id with this bit: the flow was offloaded to another data
 * center, offload_endpoints[low bits]; it stays there until that endpoint goes. */
#define FLOW_OFFLOADED 0x80000000u
#define OFFLOAD_ENDPOINTS 64          /* size of offload_endpoints */
#define OFFLOADS_PER_REGION 4         /* region_offload holds this many (region, service) per region */

/* vip_filter: one slot per hash of a destination address (xdpgw.c vip_slot,
 * dataplane/maps.py); set for every VIP, so most other packets skip the flow table */
#define VIP_FILTER_BITS 12
#define VIP_FILTER_MULT 0x9e3779b1u

/* flow_key.flags */
#define FLOW_F_FRAGMENT 1             /* ports zeroed: fragments select on addresses+proto */

/* forward_trace.action (test builds, trace.h): what the program did with the last forwarded packet */
#define FWD_LOCAL 1
#define FWD_TUNNEL 2
#define FWD_OFFLOAD 3

struct service_key {
    __u8 vip[16];
    __u16 port;                       /* host byte order */
    __u8 proto;                       /* IPPROTO_TCP / IPPROTO_UDP */
    __u8 fragment;                    /* 1: the VIP's entry for fragments (port 0) */
};

struct service_info {
    __u32 id;                         /* index into maglev_tables and service_counters */
    __u32 flags;
};

/* A cache line of a service's Maglev table: slot i is vm[i % MAGLEV_LINE_SLOTS] of
 * line i / MAGLEV_LINE_SLOTS. An array map keeps every value in a slot of at
 * least 8 bytes, so one VM id per value would take twice the memory. */
#define MAGLEV_LINE_SLOTS 16
struct maglev_line {
    __u32 vm[MAGLEV_LINE_SLOTS];      /* VM ids; XDPGW_NO_VM: none */
};

struct flow_key {                     /* the parsed flow of either family; flow_table6's key */
    __u8 src[16];
    __u8 dst[16];
    __u16 sport;                      /* host byte order; 0 for fragments */
    __u16 dport;
    __u8 proto;
    __u8 flags;                       /* FLOW_F_* */
    __u16 pad;
};

/* flow_table4's key: an IPv4 flow without the mapped prefixes, so the LRU
 * hashes and compares 16 bytes instead of 40 (ebpf/lb.h flow_key4_of). */
struct flow_key4 {
    __u8 src[4];
    __u8 dst[4];
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 flags;
    __u16 pad;
};

/* A flow's choice and what its key resolved to when it was recorded (or last
 * checked), so a hit needs neither the service lookup nor the region LPM. The
 * control plane bumps flow_generation[0] when services or region prefixes
 * change; an entry of another generation has its service and region looked up
 * again (and rewritten) but keeps its VM. */
struct flow_entry {
    __u32 vm_id;
    __u32 service_id;
    __u32 region;
    __u32 generation;
};

struct vm_location {
    __u8 kind;                        /* VM_LOC_* ; 0 = unused slot */
    __u8 state;                       /* VM_STATE_* */
    __u8 tunnel_family;               /* 4 or 6 for VM_LOC_TUNNEL */
    __u8 encap;                       /* ENCAP_* for VM_LOC_TUNNEL */
    __u32 port_slot;                  /* VM_LOC_LOCAL: index into tx_ports devmap */
    __u8 dst_mac[6];                  /* VM's MAC, or the tunnel next hop's MAC */
    __u8 src_mac[6];                  /* host port's MAC, or the uplink's MAC */
    __u8 tunnel_dst[16];              /* remote endpoint (IPv4-mapped for IPv4) */
    __u8 tunnel_src[16];              /* this gateway's tunnel source */
};

struct offload_key {
    __u32 region_id;
    __u32 service_id;
};

struct offload_ref {                  /* region_offload value */
    __u32 endpoint_id;                /* index into offload_endpoints */
    __u32 flags;
};

struct offload_target {               /* offload_endpoints value; family 0 = unused */
    __u8 family;                      /* 4 or 6 */
    __u8 encap;                       /* ENCAP_* */
    __u8 pad[2];
    __u8 endpoint[16];                /* target data center's tunnel endpoint */
    __u8 src[16];                     /* this gateway's tunnel source */
    __u8 next_hop_mac[6];
    __u8 src_mac[6];
};

/* Decapsulation (decap.h): tunnel packets to one of decap_addresses from a
 * source in decap_from_v4/v6 are served by their inner packet. */
#define DECAP_ADDRESSES 16            /* size of decap_addresses */
#define DECAP_PREFIXES 1024           /* size of decap_from_v4 and of decap_from_v6 */

struct decap_key {                    /* decap_addresses key: IPv4-mapped for IPv4 */
    __u8 addr[16];
};

struct tunnel_config {                /* tunnel_config[0] */
    __u16 gue_port;                   /* GUE's UDP port, host byte order; 0: GUE neither sent nor received */
    __u16 pad;
};

struct lpm_v4_key {
    __u32 prefixlen;
    __u8 addr[4];
};

struct lpm_v6_key {
    __u32 prefixlen;
    __u8 addr[16];
};

struct traffic_counter {              /* per-CPU; folded by the control plane */
    __u64 packets;
    __u64 bytes;
};

struct service_counter {
    __u64 packets;
    __u64 bytes;
    __u64 new_flows;
};

/* Global per-CPU stats, indexed by STAT_* (one u64 each). */
#define STAT_FLOW_HITS 0
#define STAT_FLOW_MISSES 1
#define STAT_PASS 2
#define STAT_LOCAL_FWD 3
#define STAT_TUNNEL_FWD 4
#define STAT_OFFLOAD_FWD 5
#define STAT_ICMP_ERR_FWD 6
#define STAT_FLOW_RESELECT 7          /* flow's VM gone or down: re-selected */
#define STAT_FLOOD_UNRECORDED 8       /* new flow served by Maglev but not recorded: flood */
#define STAT_CAPTURE_LOST 9           /* captured packet not recorded: capture_ring full */
#define STAT_DECAP 10                 /* tunnel packet accepted: its inner packet took the normal path */
#define STAT_MAX 11
#define STAT_SLOTS 32                 /* map size: room for new stats without a layout change */

/* Drop reasons, indexed into drop_counters. Names live in dataplane/structs.py. */
#define DROP_ETH_TRUNC 0
#define DROP_VLAN_TRUNC 1
#define DROP_VLAN_TOO_DEEP 2
#define DROP_IP4_TRUNC 3
#define DROP_IP4_BAD_VERSION 4
#define DROP_IP4_BAD_IHL 5
#define DROP_IP4_BAD_LEN 6
#define DROP_IP6_TRUNC 7
#define DROP_IP6_BAD_VERSION 8
#define DROP_IP6_BAD_LEN 9
#define DROP_IP6_EXT_TRUNC 10
#define DROP_IP6_EXT_LIMIT 11
#define DROP_L4_TRUNC 12
#define DROP_TCP_BAD_DOFF 13
#define DROP_ICMP_INNER_BAD 14
#define DROP_NO_VM 15                 /* service has no usable VM */
#define DROP_VM_LOCATION 16           /* selected VM has no location */
#define DROP_ENCAP 17                 /* could not grow the packet for the tunnel's headers */
#define DROP_UDP_BAD_LEN 18           /* UDP length disagrees with the IP payload */
#define DROP_DECAP_UNTRUSTED 19       /* tunnel packet to a decap address from outside decap_from */
#define DROP_DECAP_NESTED 20          /* its inner packet is again a tunnel packet to a decap address */
#define DROP_DECAP_FRAGMENT 21        /* an IP-in-IP fragment to a decap address: no reassembly here */
#define DROP_GUE_BAD 22               /* GUE header neither variant 1 nor variant 0 without options */

#define DROP_MAX 23
#define DROP_SLOTS 64                 /* map size: room for new reasons without a layout change */

struct flood_window {                 /* per-CPU new-flow rate over one-second windows */
    __u64 start_ns;
    __u64 new_flows;
};

struct forward_trace {                /* per-CPU, last forwarded packet (test builds, trace.h) */
    __u32 action;                     /* FWD_* */
    __u32 vm_id;
    __u32 port_slot;
    __u32 service_id;
};

/* Packet capture (capture.h, `xdpgw capture`): the one capture_filter entry
 * arms it; each captured packet is one capture_ring record: struct
 * capture_meta, rx_caplen bytes as received, tx_caplen bytes as sent. */
#define CAPTURE_ANY 0xffffffffu       /* capture_filter: field unset; capture_meta: none (no service, no VM) */
#define CAPTURE_SNAPLEN_MAX 4096      /* bytes of a frame a record holds per direction (an XDP frame fits a page) */
#define CAPTURE_RING_PAGES 256        /* capture_ring size in pages (a power of 2) */

struct capture_filter {               /* capture_filter[0] */
    __u32 armed;                      /* 0: capture off */
    __u32 snaplen;                    /* 1..CAPTURE_SNAPLEN_MAX */
    __u32 region;                     /* region id, or CAPTURE_ANY (as every field below) */
    __u32 service;                    /* service id */
    __u32 vm;                         /* VM id */
    __u32 verdict;                    /* XDP action: XDP_DROP, XDP_PASS, XDP_TX (tunnel), XDP_REDIRECT (forward) */
    __u32 reason;                     /* DROP_*: only drops with this reason */
    __u32 pad;
};

struct capture_meta {                 /* capture_ring record header */
    __u64 ts_ns;                      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u32 ifindex;                    /* ingress interface */
    __u32 region;                     /* region id (XDPGW_REGION_UNKNOWN before the IP header is valid) */
    __u32 service;                    /* service id or CAPTURE_ANY */
    __u32 vm;                         /* VM id or CAPTURE_ANY (not chosen, or offloaded) */
    __u16 verdict;                    /* XDP action */
    __u16 reason;                     /* DROP_* when verdict is XDP_DROP */
    __u16 rx_len;                     /* frame length as received */
    __u16 rx_caplen;                  /* bytes of it that follow */
    __u16 tx_len;                     /* frame length as sent (0: not rewritten) */
    __u16 tx_caplen;                  /* bytes of it that follow the received ones */
    __u32 pad;
};

/* ebpf/vmport.c: the VM-port watcher. vm_announce.kind: what a VM sent on a
 * host port (hypervisors send these after a live migration). */
#define ANNOUNCE_GARP 1               /* ARP request/reply with sender IP == target IP */
#define ANNOUNCE_RARP 2               /* ethertype 0x8035 */
#define ANNOUNCE_NA 3                 /* unsolicited ICMPv6 neighbour advertisement, override flag */
#define VMPORT_PAIR_ENTRIES 16384     /* size of vm_pair_bytes */

struct vm_announce {                  /* perf event, one per announcement */
    __u64 ts_ns;                      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u32 ifindex;                    /* the host port it arrived on */
    __u8 kind;                        /* ANNOUNCE_* */
    __u8 family;                      /* 4 or 6; 0: no address (RARP) */
    __u8 mac[6];                      /* sender MAC */
    __u8 ip[16];                      /* sender IP (IPv4-mapped for IPv4) */
    __u8 pad[4];
};

struct vm_pair_key {                  /* vm_pair_bytes key: bytes a VM sent to an address */
    __u8 src_mac[6];
    __u16 pad;
    __u8 dst[16];                     /* IPv4-mapped for IPv4 */
};

#endif
