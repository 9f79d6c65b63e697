/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Network policy lookups shared by the cgroup programs (DESIGN.md section 14).
 *
 * policy_decide() is the datapath's copy of mesh_core::policy::decide: four
 * LPM lookups, (remote, proto), (remote, any), (any, proto), (any, any), each
 * the longest port prefix holding the port; a Deny in any of them wins; else a
 * direction that is not enforced allows; else an Allow allows; else default
 * deny. The rule reported is the smallest (by rank) among the entries found
 * with the winning verdict. Ingress from the local host is always allowed
 * (kubelet probes), as mesh_core::policy::decide says.
 */
#ifndef MESH_POLICY_H
#define MESH_POLICY_H

#include "mesh.h"

struct policy_verdict {
	__u32 rule;
	__u8 verdict; /* MESH_VERDICT_* */
};

static __always_inline __u32 ipcache_identity(__u32 ip4)
{
	struct mesh_ipcache_key key = { .prefixlen = 32, .ip4 = ip4 };
	struct mesh_ipcache_value *value;

	value = bpf_map_lookup_elem(&mesh_ipcache, &key);
	return value ? value->identity : MESH_IDENTITY_WORLD;
}

static __always_inline struct mesh_policy_value *
policy_lookup(__u32 table, __u32 remote, __u8 proto, __u16 port)
{
	struct mesh_policy_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.prefixlen = MESH_POLICY_PREFIX_FIXED + 16;
	key.table = table;
	key.remote = remote;
	key.proto = proto;
	key.port = port;
	return bpf_map_lookup_elem(&mesh_policy, &key);
}

/* Folds one lookup's entry into the best deny and allow seen (smallest rank). */
static __always_inline void policy_fold(const struct mesh_policy_value *value,
					struct mesh_policy_value *deny,
					struct mesh_policy_value *allow)
{
	struct mesh_policy_value *best;

	if (!value)
		return;
	best = value->verdict == MESH_VERDICT_DENY ? deny : allow;
	if (!best->rule || value->rank < best->rank)
		*best = *value;
}

/* A policy question: may `remote` talk to the endpoint in direction `dir` on (proto,
 * port) (port in network order). */
struct policy_query {
	__u32 remote;
	__u16 port;
	__u8 proto;
	__u8 dir; /* MESH_DIRECTION_* */
};

/* The verdict for the query about the endpoint `ep`.
 *
 * A global function (not inlined): the verifier checks it once, on its own, instead of
 * once per call site and path of the caller. Inlined into connect4 and sendmsg4 with the
 * other helpers below, each program took 123k verifier steps and 0.45 s to load. */
__noinline int policy_decide(const struct mesh_policy_endpoint *ep,
			     const struct policy_query *q, struct policy_verdict *out)
{
	struct mesh_policy_value deny, allow;
	__u32 table, enforced;

	if (!out)
		return 0;
	out->rule = MESH_RULE_NONE;
	out->verdict = MESH_VERDICT_ALLOW;
	if (!ep || !q)
		return 0;
	table = q->dir == MESH_DIRECTION_INGRESS ? ep->ingress_table : ep->egress_table;
	enforced = ep->flags & (q->dir == MESH_DIRECTION_INGRESS ? MESH_POLICY_F_INGRESS_ENFORCED
								 : MESH_POLICY_F_EGRESS_ENFORCED);
	if (q->dir == MESH_DIRECTION_INGRESS && q->remote == MESH_IDENTITY_HOST)
		return 0;
	__builtin_memset(&deny, 0, sizeof(deny));
	__builtin_memset(&allow, 0, sizeof(allow));
	if (table) {
		policy_fold(policy_lookup(table, q->remote, q->proto, q->port), &deny, &allow);
		policy_fold(policy_lookup(table, q->remote, 0, q->port), &deny, &allow);
		policy_fold(policy_lookup(table, 0, q->proto, q->port), &deny, &allow);
		policy_fold(policy_lookup(table, 0, 0, q->port), &deny, &allow);
	}
	if (deny.rule) {
		out->rule = deny.rule;
		out->verdict = MESH_VERDICT_DENY;
		return 0;
	}
	if (!enforced)
		return 0;
	if (allow.rule) {
		out->rule = allow.rule;
		return 0;
	}
	out->verdict = MESH_VERDICT_DENY;
	return 0;
}

/* Counts one decision. Global, like policy_decide. */
__noinline int policy_count(__u32 local, __u32 remote, __u32 dir,
			    const struct policy_verdict *v, __u64 bytes)
{
	struct mesh_policy_counter_key key;
	struct mesh_policy_counter_value *value;

	if (!v)
		return 0;
	__builtin_memset(&key, 0, sizeof(key));
	key.local = local;
	key.remote = remote;
	key.rule = v->rule;
	key.direction = dir;
	key.verdict = v->verdict;
	value = bpf_map_lookup_elem(&mesh_policy_counters, &key);
	if (value) {
		/* Per-CPU value: no other writer, plain adds are exact. */
		value->packets += 1;
		value->bytes += bytes;
		return 0;
	}
	struct mesh_policy_counter_value init = { .packets = 1, .bytes = bytes };
	bpf_map_update_elem(&mesh_policy_counters, &key, &init, BPF_NOEXIST);
	return 0;
}

#endif /* MESH_POLICY_H */
