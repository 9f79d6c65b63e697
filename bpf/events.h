/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Flow events (DESIGN.md section 15): records of new connections and drops written to the
 * mesh_events ring buffer, bounded by a per-CPU token bucket, every record that could not
 * be written counted in mesh_event_stats (mesh.h documents the record and the maps).
 */
#ifndef MESH_EVENTS_H
#define MESH_EVENTS_H

#include "mesh.h"

#define EVENT_TOKEN 1000000000ULL /* one record, in token units (per-ns refill * rate) */

/* The event configuration, or NULL when events are off. */
static __always_inline struct mesh_event_config *events_on(void)
{
	__u32 zero = 0;
	struct mesh_event_config *cfg = bpf_map_lookup_elem(&mesh_event_config, &zero);

	return cfg && cfg->rate ? cfg : NULL;
}

/* Takes a token from this CPU's bucket; counts the record as rate limited when empty. */
static __always_inline int event_admit(const struct mesh_event_config *cfg,
				       struct mesh_event_stats *st, __u64 now)
{
	__u64 elapsed = now - st->last_ns;
	__u64 cap = (__u64)cfg->burst * EVENT_TOKEN;
	__u64 tokens;

	/* A second refills at most `rate` tokens: the product stays far below 2^64. */
	if (elapsed > 1000000000ULL)
		elapsed = 1000000000ULL;
	tokens = st->tokens + elapsed * cfg->rate;
	if (tokens > cap)
		tokens = cap;
	st->last_ns = now;
	if (tokens < EVENT_TOKEN) {
		st->tokens = tokens;
		st->rate_limited += 1;
		return 0;
	}
	st->tokens = tokens - EVENT_TOKEN;
	return 1;
}

/* Whether a UDP (socket, peer, direction) has not been reported in the last
 * MESH_EVENT_UDP_REPEAT_NS; records it as reported now. */
static __always_inline int event_udp_fresh(__u64 cookie, __u32 ip4, __u16 port, __u8 dir,
					   __u64 now)
{
	struct mesh_event_seen_key key;
	__u64 *last;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = cookie;
	key.remote_ip = ip4;
	key.remote_port = port;
	key.direction = dir;
	last = bpf_map_lookup_elem(&mesh_event_seen, &key);
	if (last && now - *last < MESH_EVENT_UDP_REPEAT_NS)
		return 0;
	bpf_map_update_elem(&mesh_event_seen, &key, &now, BPF_ANY);
	return 1;
}

/* Writes `ev` (its time set here) if events are on and the bucket has a token. A global
 * function: verified once, not once per call site (see policy_decide). */
__noinline int event_emit(struct mesh_flow_event *ev)
{
	__u32 zero = 0;
	struct mesh_event_config *cfg = events_on();
	struct mesh_event_stats *st;
	__u64 now, flags;

	if (!cfg || !ev)
		return 0;
	st = bpf_map_lookup_elem(&mesh_event_stats, &zero);
	if (!st)
		return 0;
	now = bpf_ktime_get_boot_ns();
	if (ev->proto == IPPROTO_UDP && ev->verdict == MESH_EVENT_FORWARDED) {
		__u32 remote_ip = ev->direction == MESH_DIRECTION_EGRESS ? ev->dst_ip : ev->src_ip;
		__u16 remote_port = ev->direction == MESH_DIRECTION_EGRESS ? ev->dst_port : ev->src_port;

		if (!event_udp_fresh(ev->cookie, remote_ip, remote_port, ev->direction, now))
			return 0;
	}
	if (!event_admit(cfg, st, now))
		return 0;
	ev->time_ns = now;
	/* Adaptive notification: the reader is woken only once a batch is waiting and drains on
	 * its own short timer otherwise, so a busy node pays no wakeup (and context switch) per
	 * connection. */
	flags = bpf_ringbuf_query(&mesh_events, BPF_RB_AVAIL_DATA) >= MESH_EVENT_WAKEUP_BYTES
			? BPF_RB_FORCE_WAKEUP
			: BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_output(&mesh_events, ev, sizeof(*ev), flags))
		st->lost_ring_full += 1;
	else
		st->emitted += 1;
	return 0;
}

/* The drop reason of a policy refusal. */
static __always_inline __u8 event_policy_reason(__u32 rule)
{
	return rule ? MESH_DROP_POLICY_RULE : MESH_DROP_POLICY_DEFAULT;
}

#endif /* MESH_EVENTS_H */
