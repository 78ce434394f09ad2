// SPDX-License-Identifier: GPL-2.0
/* Element counts of hash maps, read without walking them: a bpf_map iterator
 * (one pass over every map of the system) that writes, for each hash-type map,
 * its id and the count the kernel keeps for it (the kfunc
 * bpf_map_sum_elem_count, Linux 6.6+). Built with clang (CO-RE, no vmlinux.h:
 * the few kernel types are declared here) and loaded with libbpf by
 * dataplane/elemcount.py, which picks its maps' ids out of the records. */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct bpf_map {
	__u32 id;
	enum bpf_map_type map_type;
} __attribute__((preserve_access_index));

struct bpf_iter__bpf_map {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
} __attribute__((preserve_access_index));

extern __s64 bpf_map_sum_elem_count(const struct bpf_map *map) __ksym;

/* one record per hash map; dataplane/elemcount.py reads the same layout */
struct elem_count {
	__u32 id;
	__u32 pad;
	__s64 count;
};

SEC("iter/bpf_map")
int elem_counts(struct bpf_iter__bpf_map *ctx)
{
	struct bpf_map *map = ctx->map;
	struct elem_count rec = {};

	if (!map)		/* the call that ends the iteration */
		return 0;
	switch (map->map_type) {
	case BPF_MAP_TYPE_HASH:
	case BPF_MAP_TYPE_PERCPU_HASH:
	case BPF_MAP_TYPE_LRU_HASH:
	case BPF_MAP_TYPE_LRU_PERCPU_HASH:
		break;
	default:
		return 0;
	}
	rec.id = map->id;
	rec.count = bpf_map_sum_elem_count(map);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
