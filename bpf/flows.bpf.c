// SPDX-License-Identifier: GPL-2.0
/*
 * Flow accounting per identity pair (IPv4).
 *
 * Looks the source and destination addresses of every IPv4 packet up in the
 * ipcache and adds the packet to the counters of (source identity,
 * destination identity); an address the ipcache does not know is "world".
 * Observes only: always TC_ACT_OK, never drops or modifies a packet.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mesh.h"

static __always_inline __u32 identity_of(__u32 ip4)
{
	struct mesh_ipcache_key key = { .prefixlen = 32, .ip4 = ip4 };
	struct mesh_ipcache_value *value;

	value = bpf_map_lookup_elem(&mesh_ipcache, &key);
	return value ? value->identity : MESH_IDENTITY_WORLD;
}

static __always_inline void count_flow(__u32 src, __u32 dst, __u64 bytes)
{
	struct mesh_flow_key key = { .src_identity = src, .dst_identity = dst };
	struct mesh_flow_value *value;

	value = bpf_map_lookup_elem(&mesh_flows, &key);
	if (value) {
		/* Per-CPU value: no other writer, plain adds are exact. */
		value->packets += 1;
		value->bytes += bytes;
		return;
	}
	struct mesh_flow_value init = { .packets = 1, .bytes = bytes };
	/* BPF_NOEXIST: a concurrent insert from this CPU cannot happen, an
	 * insert from another CPU creates its own per-CPU slot. */
	bpf_map_update_elem(&mesh_flows, &key, &init, BPF_NOEXIST);
}

static __always_inline void account(struct __sk_buff *skb)
{
	struct iphdr ip;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return;
	if (ip.version != 4)
		return;
	count_flow(identity_of(ip.saddr), identity_of(ip.daddr), skb->len);
}

SEC("classifier")
int mesh_flows_tc(struct __sk_buff *skb)
{
	account(skb);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
