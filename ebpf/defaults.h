/* Default of every -D parameter of the XDP program. dataplane/program.py reads
 * this file for the defaults of its Sizes and passes each configured value as
 * a -D flag; the defaults here apply when a file is compiled alone. */
#ifndef XDPGW_DEFAULTS_H
#define XDPGW_DEFAULTS_H

#ifndef XDPGW_FLOW_ENTRIES
#define XDPGW_FLOW_ENTRIES 65536       /* entries of each flow table (flow_table4, flow_table6) */
#endif
#ifndef XDPGW_MAX_SERVICES
#define XDPGW_MAX_SERVICES 64
#endif
#ifndef XDPGW_MAX_VMS
#define XDPGW_MAX_VMS 1024
#endif
#ifndef XDPGW_MAX_REGIONS
#define XDPGW_MAX_REGIONS 256
#endif
#ifndef XDPGW_MAX_PREFIXES
#define XDPGW_MAX_PREFIXES 4096        /* per family */
#endif
#ifndef XDPGW_MAX_PORTS
#define XDPGW_MAX_PORTS 256            /* tx_ports devmap slots */
#endif
#ifndef XDPGW_MAGLEV_M
#define XDPGW_MAGLEV_M 65537           /* Maglev table size, a prime */
#endif
#ifndef XDPGW_HASH_SEED
#define XDPGW_HASH_SEED 0              /* flow hash seed; the control plane predicts with the same */
#endif
#ifndef XDPGW_NEW_FLOW_LIMIT
#define XDPGW_NEW_FLOW_LIMIT 0         /* new flows per CPU per second before flood mode; 0: no limit */
#endif

#endif
