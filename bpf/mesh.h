/* SPDX-License-Identifier: Apache-2.0 */
/*
 * mesh datapath: the map layouts shared by the eBPF programs (C) and the
 * agent (Rust, mesh-agent/src/datapath/layout.rs). This header is the one C
 * definition of those layouts; the Rust mirrors are checked against it by a
 * test that compiles this header and compares sizes and offsets.
 *
 * Conventions:
 *  - addresses and ports are in network byte order (as the kernel hands them
 *    to sock_addr programs), everything else in host order;
 *  - every struct is padded explicitly so hash keys never carry garbage bytes
 *    and both sides agree on the layout; no bools;
 *  - IPv4 only for now. IPv6 gets its own maps (mesh_ipcache6, mesh_services6,
 *    ...) with 16-byte addresses, so these layouts never change meaning.
 *
 * The struct part is plain C (only <linux/types.h>) so that a host compiler
 * can include it; the map definitions are only compiled for the BPF target.
 */
#ifndef MESH_H
#define MESH_H

#include <linux/types.h>

/* Reserved identities (DESIGN.md section 4). */
#define MESH_IDENTITY_HOST 1
#define MESH_IDENTITY_WORLD 2
#define MESH_IDENTITY_REMOTE_NODE 6

/* Map sizes. The agent refuses to program more than these. */
#define MESH_IPCACHE_MAX 524288
#define MESH_SERVICES_MAX 262144
#define MESH_BACKENDS_MAX 262144
#define MESH_REV_NAT_MAX 262144
#define MESH_SOCK_REV_MAX 131072
#define MESH_FLOWS_MAX 65536

/* mesh_ipcache: LPM trie, longest prefix wins. */
struct mesh_ipcache_key {
	__u32 prefixlen; /* bits of `ip4` that matter, 0..=32 */
	__u32 ip4;       /* network order */
};

/* mesh_ipcache_value.flags */
#define MESH_IPCACHE_F_LOCAL (1U << 0)  /* endpoint on this node */
#define MESH_IPCACHE_F_REMOTE (1U << 1) /* endpoint of another cluster */

struct mesh_ipcache_value {
	__u32 identity;
	__u32 tunnel_endpoint; /* node IP, network order, 0 = none */
	__u16 cluster_id;
	__u16 pad;
	__u32 flags;
};

/* mesh_services: hash. Slot 0 is the master entry (count = number of backend
 * slots, backend_id unused); slots 1..=count hold backend ids, each with a copy of
 * its mesh_backends entry (the connect path reads the backend here: one hash lookup
 * fewer per translated connect()). */
struct mesh_service_key {
	__u32 vip;   /* network order */
	__u16 port;  /* network order */
	__u16 slot;  /* host order */
	__u8 proto;  /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad[3];
};

/* mesh_backends: hash, key = backend id (__u32, host order, never 0). */
struct mesh_backend_value {
	__u32 ip;   /* network order */
	__u16 port; /* network order */
	__u8 proto;
	__u8 pad;
	__u16 cluster_id;
	__u16 pad2;
	__u32 flags;
};

struct mesh_service_value {
	__u32 backend_id; /* slot > 0: key of mesh_backends */
	__u16 count;      /* slot 0: number of backend slots */
	__u16 pad;
	__u32 flags;
	struct mesh_backend_value backend; /* slot > 0: mesh_backends[backend_id]; slot 0: 0 */
};


/* mesh_rev_nat: LRU hash. Written when a socket's destination is rewritten to
 * a backend; read by recvmsg4/getpeername4 to show the service address again. */
struct mesh_rev_nat_key {
	__u64 cookie;      /* bpf_get_socket_cookie() */
	__u32 backend_ip;  /* network order */
	__u16 backend_port; /* network order */
	__u16 pad;
};

struct mesh_rev_nat_value {
	__u32 vip;  /* network order */
	__u16 port; /* network order */
	__u16 pad;
};

/* mesh_sock_rev: LRU hash by socket cookie, of a socket whose connect() socket
 * LB rewrote: the backend it was given and the frontend to show again. Read by
 * recvmsg4/getpeername4 and by sock_ops (passive health); the entry is deleted
 * when the socket is released (cgroup/sock_release), so the map holds the open
 * translated sockets, and the LRU only evicts when more than MESH_SOCK_REV_MAX
 * are open (or a release was missed). Preallocated: neither the connect() that
 * writes an entry nor the close() that deletes it allocates or frees memory.
 * Unconnected UDP (sendmsg4: one socket, many destinations) keeps mesh_rev_nat. */
struct mesh_sock_rev {
	__u32 backend_ip;   /* network order */
	__u16 backend_port; /* network order */
	__u16 port;         /* frontend, network order */
	__u32 vip;          /* network order */
};

/* mesh_flows: LRU per-CPU hash, per identity pair. */
struct mesh_flow_key {
	__u32 src_identity;
	__u32 dst_identity;
};

struct mesh_flow_value {
	__u64 packets;
	__u64 bytes;
};

/* ---- network policy (DESIGN.md section 14) ----
 *
 * The agent compiles the policies into verdict tables (mesh_core::policy::compile) and
 * programs them here; the lookup below reproduces mesh_core::policy::decide.
 *
 * - mesh_policy_endpoints: local identity -> its ingress and egress table ids and whether
 *   each direction is enforced (default deny). An identity not in it has no policy.
 * - mesh_policy: LPM trie, (table, remote identity | 0 = any, protocol | 0 = any, port
 *   prefix) -> verdict and rule. Tables are shared by identities that the same policies
 *   select, so the map holds each table once.
 * - mesh_policy_netns: the network namespace (cookie) of each local endpoint -> its identity:
 *   connect4/sendmsg4 run before the source address is chosen, the netns names the client.
 * - mesh_policy_replies: UDP peers a local socket sent to, so their replies pass ingress.
 * - mesh_policy_counters: verdicts per (local, remote, rule, direction, verdict).
 * - mesh_policy_rules: rule id -> the rule's name, for meshctl.
 */
#define MESH_POLICY_ENDPOINTS_MAX 65536
#define MESH_POLICY_MAX 1048576
#define MESH_POLICY_NETNS_MAX 65536
#define MESH_POLICY_REPLIES_MAX 262144
#define MESH_POLICY_COUNTERS_MAX 65536
#define MESH_POLICY_RULES_MAX 65536

/* mesh_policy_endpoint.flags */
#define MESH_POLICY_F_INGRESS_ENFORCED (1U << 0)
#define MESH_POLICY_F_EGRESS_ENFORCED (1U << 1)

struct mesh_policy_endpoint {
	__u32 ingress_table; /* 0 = no entries */
	__u32 egress_table;  /* 0 = no entries */
	__u32 flags;
};

/* Bits of mesh_policy_key before `port`: table, remote, proto, pad. */
#define MESH_POLICY_PREFIX_FIXED 80

struct mesh_policy_key {
	__u32 prefixlen; /* MESH_POLICY_PREFIX_FIXED + port prefix bits (0..=16) */
	__u32 table;
	__u32 remote;    /* identity, 0 = any */
	__u8 proto;      /* IPPROTO_*, 0 = any */
	__u8 pad;
	__u16 port;      /* network order */
};

#define MESH_VERDICT_ALLOW 1
#define MESH_VERDICT_DENY 2

struct mesh_policy_value {
	__u32 rule; /* rule id (mesh_policy_rules), never 0 */
	__u32 rank; /* the rule's position in the sorted rules: the smallest reports */
	__u8 verdict;
	__u8 pad[3];
};

struct mesh_policy_netns_value {
	__u32 identity;
	__u32 ip4; /* network order */
};

struct mesh_policy_reply_key {
	__u64 cookie;     /* bpf_get_socket_cookie() */
	__u32 remote_ip;  /* network order */
	__u16 remote_port; /* network order */
	__u16 pad;
};

#define MESH_DIRECTION_INGRESS 0
#define MESH_DIRECTION_EGRESS 1

/* Rule ids of verdicts no rule decided. */
#define MESH_RULE_NONE 0          /* not enforced (allow) or default deny */

struct mesh_policy_counter_key {
	__u32 local;
	__u32 remote;
	__u32 rule;
	__u8 direction;
	__u8 verdict;
	__u16 pad;
};

struct mesh_policy_counter_value {
	__u64 packets;
	__u64 bytes;
};

#define MESH_POLICY_RULE_NAME_LEN 248

struct mesh_policy_rule_name {
	char name[MESH_POLICY_RULE_NAME_LEN];
};

/* ---- flow events (DESIGN.md section 15) ----
 *
 * One record per new connection or drop, through the mesh_events ring buffer: a
 * connect()/sendmsg() of a local endpoint (egress: its socket-LB translation, its egress
 * verdict), the first packet to a local endpoint (ingress: its verdict), and every refusal.
 * Not per packet: TCP reports its connect() and its SYN, UDP each (socket, peer) at most once
 * per MESH_EVENT_UDP_REPEAT_NS. A per-CPU token bucket (mesh_event_config) bounds the rate;
 * every record that could not be written is counted in mesh_event_stats.
 */
#define MESH_EVENTS_RING_BYTES (1U << 20)
#define MESH_EVENT_SEEN_MAX 65536
#define MESH_EVENT_UDP_REPEAT_NS (5ULL * 1000000000ULL)
/* A record wakes the reader only when this much is waiting; the agent also drains the ring
 * every 10 ms (mesh-agent flows::DRAIN_INTERVAL), so a record is read within 10 ms. */
#define MESH_EVENT_WAKEUP_BYTES (64U * 1024)

/* mesh_flow_event.verdict */
#define MESH_EVENT_FORWARDED 1
#define MESH_EVENT_DROPPED 2

/* mesh_flow_event.reason (a drop's cause; 0 for forwarded records) */
#define MESH_DROP_NONE 0
#define MESH_DROP_POLICY_DEFAULT 1 /* enforced direction, no allow rule: default deny */
#define MESH_DROP_POLICY_RULE 2    /* a deny rule */
#define MESH_DROP_NO_BACKEND 3     /* a service with no usable backend */

/* mesh_flow_event.flags */
#define MESH_EVENT_F_TRANSLATED (1U << 0) /* socket LB rewrote the destination */
#define MESH_EVENT_F_POLICY (1U << 1)     /* a policy decided (rule or default deny) */

struct mesh_flow_event {
	__u64 time_ns;      /* bpf_ktime_get_boot_ns() */
	__u64 cookie;       /* socket cookie */
	__u32 src_ip;       /* network order; 0 when the socket is not bound yet */
	__u32 dst_ip;       /* network order: the backend, after translation */
	__u32 orig_ip;      /* network order: the service frontend, when translated */
	__u32 src_identity; /* 0: unknown (a host process) */
	__u32 dst_identity;
	__u32 rule;         /* policy rule id (mesh_policy_rules), 0: none */
	__u16 src_port;     /* network order; 0 when not bound yet */
	__u16 dst_port;     /* network order */
	__u16 orig_port;    /* network order */
	__u16 backend_cluster; /* cluster id of the chosen backend, 0: none */
	__u8 direction;     /* MESH_DIRECTION_* */
	__u8 proto;         /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 verdict;       /* MESH_EVENT_FORWARDED / MESH_EVENT_DROPPED */
	__u8 reason;        /* MESH_DROP_* */
	__u8 flags;         /* MESH_EVENT_F_* */
	__u8 pad[7];
};

/* mesh_event_config[0]: written by the agent. rate == 0 turns events off. */
struct mesh_event_config {
	__u32 rate;  /* records per second per CPU */
	__u32 burst; /* bucket size */
};

/* mesh_event_stats: per-CPU array, index 0. */
struct mesh_event_stats {
	__u64 emitted;
	__u64 lost_ring_full;  /* the ring buffer had no room: the agent did not keep up */
	__u64 rate_limited;    /* over the per-CPU rate */
	__u64 tokens;          /* token bucket: tokens left, scaled by 1e9 */
	__u64 last_ns;         /* token bucket: last refill */
};

struct mesh_event_seen_key {
	__u64 cookie;
	__u32 remote_ip;
	__u16 remote_port;
	__u8 direction;
	__u8 pad;
};

/* ---- passive backend health (DESIGN.md section 13b) ----
 *
 * A cgroup sock_ops program watches TCP connections that socket LB translated (a
 * mesh_sock_rev entry names the socket's peer) and counts, per backend, connects
 * that failed (SYN_SENT -> CLOSE: refused, unreachable, or given up; and the first SYN
 * retransmission, an early sign of a dead backend) and that succeeded. The agent reads the
 * counters and quarantines failing backends on this node (mesh_core::health).
 */
#define MESH_HEALTH_MAX 65536

struct mesh_health_key {
	__u32 ip;   /* network order */
	__u16 port; /* network order */
	__u8 proto;
	__u8 pad;
};

struct mesh_health_value {
	__u64 last_failure_ns; /* bpf_ktime_get_boot_ns() */
	__u64 last_success_ns;
	__u64 failures;        /* ever */
	__u64 successes;       /* ever */
};

/* mesh_quarantine: written by the agent only (meshctl bpf lb list reads it). */
struct mesh_quarantine_value {
	__u64 until_unix_ms;
	__u32 failures; /* consecutive failures that led to it */
	__u32 level;    /* backoff level: the period is base << level, capped */
};

#if defined(__bpf__)
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_IPCACHE_MAX);
	__type(key, struct mesh_ipcache_key);
	__type(value, struct mesh_ipcache_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_SERVICES_MAX);
	__type(key, struct mesh_service_key);
	__type(value, struct mesh_service_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_BACKENDS_MAX);
	__type(key, __u32);
	__type(value, struct mesh_backend_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESH_REV_NAT_MAX);
	__type(key, struct mesh_rev_nat_key);
	__type(value, struct mesh_rev_nat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_rev_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESH_SOCK_REV_MAX);
	__type(key, __u64); /* bpf_get_socket_cookie() */
	__type(value, struct mesh_sock_rev);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_sock_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, MESH_FLOWS_MAX);
	__type(key, struct mesh_flow_key);
	__type(value, struct mesh_flow_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_POLICY_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, struct mesh_policy_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_POLICY_MAX);
	__type(key, struct mesh_policy_key);
	__type(value, struct mesh_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_POLICY_NETNS_MAX);
	__type(key, __u64);
	__type(value, struct mesh_policy_netns_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESH_POLICY_REPLIES_MAX);
	__type(key, struct mesh_policy_reply_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy_replies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, MESH_POLICY_COUNTERS_MAX);
	__type(key, struct mesh_policy_counter_key);
	__type(value, struct mesh_policy_counter_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_POLICY_RULES_MAX);
	__type(key, __u32);
	__type(value, struct mesh_policy_rule_name);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MESH_EVENTS_RING_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mesh_event_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_event_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mesh_event_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_event_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESH_EVENT_SEEN_MAX);
	__type(key, struct mesh_event_seen_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_event_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESH_HEALTH_MAX);
	__type(key, struct mesh_health_key);
	__type(value, struct mesh_health_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_backend_health SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESH_HEALTH_MAX);
	__type(key, struct mesh_health_key);
	__type(value, struct mesh_quarantine_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_quarantine SEC(".maps");

#endif /* __bpf__ */

#endif /* MESH_H */
