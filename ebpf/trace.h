/* The forward trace: what the program did with the last packet it forwarded
 * (struct forward_trace), for the packet tests to check the chosen VM and port.
 * Only a test build has it (-DXDPGW_TEST_TRACE, dataplane/program.py load(trace=True)):
 * the production program has neither the map nor the per-packet write. */
#ifndef XDPGW_TRACE_H
#define XDPGW_TRACE_H

#include "structs.h"

#ifdef XDPGW_TEST_TRACE
BPF_PERCPU_ARRAY(forward_traces, struct forward_trace, 1);

static __always_inline void trace_forward(__u32 action, __u32 vm_id, __u32 slot, __u32 service_id)
{
    __u32 zero = 0;
    struct forward_trace *t = forward_traces.lookup(&zero);
    if (t) {
        t->action = action;
        t->vm_id = vm_id;
        t->port_slot = slot;
        t->service_id = service_id;
    }
}
#else
#define trace_forward(action, vm_id, slot, service_id) do { } while (0)
#endif

#endif
