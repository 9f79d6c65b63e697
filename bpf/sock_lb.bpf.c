// SPDX-License-Identifier: GPL-2.0
/*
 * Socket-level load balancing for mesh services (IPv4).
 *
 * connect4/sendmsg4 rewrite a destination that is a service frontend
 * (vip, port, proto) to one backend picked at random among slots 1..=count of
 * the service, once per connection (TCP, connected UDP) or per datagram
 * (unconnected UDP). A service that exists with count == 0 refuses the call
 * (the syscall fails with EPERM at once): a client must never reach a stale
 * backend. recvmsg4/getpeername4 translate the backend address back to the
 * frontend, using the reverse entry recorded at rewrite time.
 *
 * Entry points are thin; the logic is in the static functions.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mesh.h"
#include "policy.h"
#include "events.h"

#define SOCK_ALLOW 1
#define SOCK_DENY 0

enum xlate_result {
	XLATE_NOT_SERVICE = 0,
	XLATE_DONE = 1,
	XLATE_NO_BACKEND = 2,
	XLATE_DENIED = 3,
};

static __always_inline void service_key_init(struct mesh_service_key *key,
					     __u32 vip, __u16 port, __u8 proto,
					     __u16 slot)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->vip = vip;
	key->port = port;
	key->proto = proto;
	key->slot = slot;
}

/* The calling socket's endpoint: its identity and policy, when its network
 * namespace is a local endpoint's and a policy selects it. */
struct client {
	__u32 identity; /* 0 = not a known endpoint */
	__u32 ip4;      /* network order, when a known endpoint */
	struct mesh_policy_endpoint policy;
	__u8 has_policy;
};

static __always_inline void client_of(struct bpf_sock_addr *ctx, struct client *c)
{
	struct mesh_policy_netns_value *ns;
	struct mesh_policy_endpoint *ep;
	__u64 cookie = bpf_get_netns_cookie(ctx);

	__builtin_memset(c, 0, sizeof(*c));
	ns = bpf_map_lookup_elem(&mesh_policy_netns, &cookie);
	if (!ns)
		return;
	c->identity = ns->identity;
	c->ip4 = ns->ip4;
	ep = bpf_map_lookup_elem(&mesh_policy_endpoints, &c->identity);
	if (!ep)
		return;
	c->policy = *ep;
	c->has_policy = 1;
}

/* Whether the client's egress policy matters at all: an enforced direction or
 * deny entries. */
static __always_inline int egress_active(const struct client *c)
{
	return c->has_policy &&
	       (c->policy.egress_table || (c->policy.flags & MESH_POLICY_F_EGRESS_ENFORCED));
}

static __always_inline void egress_verdict(const struct client *c, __u32 ip4, __u16 port,
					   __u8 proto, __u32 *remote,
					   struct policy_verdict *v)
{
	struct policy_query q = { .port = port, .proto = proto, .dir = MESH_DIRECTION_EGRESS };

	*remote = ipcache_identity(ip4);
	q.remote = *remote;
	policy_decide(&c->policy, &q, v);
}

static __always_inline struct mesh_backend_value *
backend_at(__u32 vip, __u16 port, __u8 proto, __u16 slot)
{
	struct mesh_service_key key;
	struct mesh_service_value *slot_entry;

	service_key_init(&key, vip, port, proto, slot);
	slot_entry = bpf_map_lookup_elem(&mesh_services, &key);
	/* The agent writes slots before the count, so a missing slot means a
	 * broken map: fail closed rather than connect somewhere unexpected. */
	if (!slot_entry || !slot_entry->backend_id)
		return NULL;
	/* The slot's copy of mesh_backends[backend_id], kept equal by the agent. */
	return &slot_entry->backend;
}

/* bpf_loop state of the search for an allowed backend. */
struct probe_ctx {
	const struct client *client;
	__u32 vip;
	__u16 port;
	__u8 proto;
	__u8 found;
	__u16 count;
	__u16 start; /* 0-based */
	struct mesh_backend_value backend;
	__u32 remote;
	struct policy_verdict verdict;
	/* The first denial seen, reported when nothing is allowed. */
	__u32 denied_remote;
	struct policy_verdict denied;
	__u8 broken;
};

static long probe_slot(__u64 i, void *data)
{
	struct probe_ctx *p = data;
	struct mesh_backend_value *backend;
	struct policy_verdict v;
	__u32 remote;
	__u16 slot = (__u16)((p->start + i) % p->count) + 1;

	backend = backend_at(p->vip, p->port, p->proto, slot);
	if (!backend) {
		p->broken = 1;
		return 1;
	}
	egress_verdict(p->client, backend->ip, backend->port, p->proto, &remote, &v);
	if (v.verdict == MESH_VERDICT_ALLOW) {
		p->backend = *backend;
		p->remote = remote;
		p->verdict = v;
		p->found = 1;
		return 1;
	}
	if (i == 0) {
		p->denied_remote = remote;
		p->denied = v;
	}
	return 0;
}

/* Picks a backend for (vip, port, proto) that the client's egress policy
 * allows. On XLATE_DONE *out holds it; *remote and *v say why it was allowed,
 * or, on XLATE_DENIED, why the service was refused. */
static __always_inline enum xlate_result
select_backend(__u32 vip, __u16 port, __u8 proto, const struct client *c,
	       struct mesh_backend_value *out, __u32 *remote, struct policy_verdict *v)
{
	struct mesh_service_key key;
	struct mesh_service_value *master;
	struct mesh_backend_value *backend;
	__u16 count, start;

	service_key_init(&key, vip, port, proto, 0);
	master = bpf_map_lookup_elem(&mesh_services, &key);
	if (!master)
		return XLATE_NOT_SERVICE;
	count = master->count;
	if (count == 0)
		return XLATE_NO_BACKEND;
	start = (__u16)(bpf_get_prandom_u32() % count);

	if (!egress_active(c)) {
		backend = backend_at(vip, port, proto, start + 1);
		if (!backend)
			return XLATE_NO_BACKEND;
		*out = *backend;
		return XLATE_DONE;
	}

	struct probe_ctx p;
	__builtin_memset(&p, 0, sizeof(p));
	p.client = c;
	p.vip = vip;
	p.port = port;
	p.proto = proto;
	p.count = count;
	p.start = start;
	bpf_loop(count, probe_slot, &p, 0);
	if (p.broken)
		return XLATE_NO_BACKEND;
	if (!p.found) {
		*remote = p.denied_remote;
		*v = p.denied;
		return XLATE_DENIED;
	}
	*out = p.backend;
	*remote = p.remote;
	*v = p.verdict;
	return XLATE_DONE;
}

/* Lets replies from (ip4, port) to this UDP socket pass ingress policy. */
static __always_inline void record_reply(struct bpf_sock_addr *ctx, __u32 ip4, __u16 port)
{
	struct mesh_policy_reply_key key;
	__u32 one = 1;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.remote_ip = ip4;
	key.remote_port = port;
	bpf_map_update_elem(&mesh_policy_replies, &key, &one, BPF_ANY);
}

static __always_inline void record_rev_nat(struct bpf_sock_addr *ctx,
					   const struct mesh_backend_value *backend,
					   __u32 vip, __u16 port)
{
	struct mesh_rev_nat_key key;
	struct mesh_rev_nat_value value;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memset(&value, 0, sizeof(value));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.backend_ip = backend->ip;
	key.backend_port = backend->port;
	value.vip = vip;
	value.port = port;
	/* Best effort: an LRU map makes room; a failed update only means the
	 * peer address shows the backend instead of the frontend. */
	bpf_map_update_elem(&mesh_rev_nat, &key, &value, BPF_ANY);
}

/* The same for a connect(): by the socket's cookie (mesh_sock_rev), deleted when the socket
 * is released (mesh_sock_release). Best effort too: without it the peer address shows the
 * backend and passive health does not see the socket. */
static __always_inline void record_sock_rev(struct bpf_sock_addr *ctx,
					    const struct mesh_backend_value *backend,
					    __u32 vip, __u16 port)
{
	struct mesh_sock_rev r;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	__builtin_memset(&r, 0, sizeof(r));
	r.backend_ip = backend->ip;
	r.backend_port = backend->port;
	r.vip = vip;
	r.port = port;
	bpf_map_update_elem(&mesh_sock_rev, &cookie, &r, BPF_ANY);
}

/* The egress record of a connect()/sendmsg(): `dst_ip`/`dst_port` the final destination. */
static __always_inline void egress_event(struct bpf_sock_addr *ctx, const struct client *c,
					 __u32 vip, __u16 port, __u8 proto, __u32 dst_ip,
					 __u16 dst_port, __u32 remote, const struct policy_verdict *v,
					 __u8 verdict, __u8 reason, __u8 flags, __u16 cluster)
{
	struct mesh_flow_event ev;

	/* Off (the default): not even the record's cookie and ipcache lookup. */
	if (!events_on())
		return;
	__builtin_memset(&ev, 0, sizeof(ev));
	ev.cookie = bpf_get_socket_cookie(ctx);
	ev.src_ip = c->ip4;
	ev.src_identity = c->identity;
	ev.dst_ip = dst_ip;
	ev.dst_port = dst_port;
	ev.dst_identity = remote ? remote : ipcache_identity(dst_ip);
	if (flags & MESH_EVENT_F_TRANSLATED) {
		ev.orig_ip = vip;
		ev.orig_port = port;
	}
	ev.rule = v->rule;
	ev.backend_cluster = cluster;
	ev.direction = MESH_DIRECTION_EGRESS;
	ev.proto = proto;
	ev.verdict = verdict;
	ev.reason = reason;
	ev.flags = flags;
	event_emit(&ev);
}

/* Forward translation and egress policy, shared by connect4 (`connected`) and sendmsg4.
 * Records a flow event for every refusal, every translation, and every connection of a
 * known endpoint. */
static __always_inline int sock4_forward(struct bpf_sock_addr *ctx, int connected)
{
	struct mesh_backend_value backend;
	struct policy_verdict v = { MESH_RULE_NONE, MESH_VERDICT_ALLOW };
	struct client c;
	__u32 remote = 0;
	__u32 vip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	__u8 proto = (__u8)ctx->protocol;
	__u8 policy_flag;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SOCK_ALLOW;
	client_of(ctx, &c);
	policy_flag = egress_active(&c) ? MESH_EVENT_F_POLICY : 0;

	switch (select_backend(vip, port, proto, &c, &backend, &remote, &v)) {
	case XLATE_NOT_SERVICE:
		if (policy_flag) {
			egress_verdict(&c, vip, port, proto, &remote, &v);
			policy_count(c.identity, remote, MESH_DIRECTION_EGRESS, &v, 0);
			if (v.verdict == MESH_VERDICT_DENY) {
				egress_event(ctx, &c, vip, port, proto, vip, port, remote, &v,
					     MESH_EVENT_DROPPED, event_policy_reason(v.rule),
					     MESH_EVENT_F_POLICY, 0);
				return SOCK_DENY;
			}
		}
		if (c.identity)
			egress_event(ctx, &c, vip, port, proto, vip, port, remote, &v,
				     MESH_EVENT_FORWARDED, MESH_DROP_NONE,
				     v.rule ? policy_flag : 0, 0);
		break;
	case XLATE_NO_BACKEND:
		egress_event(ctx, &c, vip, port, proto, vip, port, 0, &v, MESH_EVENT_DROPPED,
			     MESH_DROP_NO_BACKEND, 0, 0);
		return SOCK_DENY;
	case XLATE_DENIED:
		policy_count(c.identity, remote, MESH_DIRECTION_EGRESS, &v, 0);
		egress_event(ctx, &c, vip, port, proto, vip, port, remote, &v, MESH_EVENT_DROPPED,
			     event_policy_reason(v.rule), MESH_EVENT_F_POLICY, 0);
		return SOCK_DENY;
	case XLATE_DONE:
		if (policy_flag)
			policy_count(c.identity, remote, MESH_DIRECTION_EGRESS, &v, 0);
		egress_event(ctx, &c, vip, port, proto, backend.ip, backend.port, remote, &v,
			     MESH_EVENT_FORWARDED, MESH_DROP_NONE,
			     MESH_EVENT_F_TRANSLATED | (v.rule ? policy_flag : 0),
			     backend.cluster_id);
		if (connected)
			record_sock_rev(ctx, &backend, vip, port);
		else
			record_rev_nat(ctx, &backend, vip, port);
		ctx->user_ip4 = backend.ip;
		ctx->user_port = (__u32)backend.port;
		break;
	}
	if (proto == IPPROTO_UDP && (c.has_policy || events_on()))
		record_reply(ctx, ctx->user_ip4, (__u16)ctx->user_port);
	return SOCK_ALLOW;
}

/* Reverse translation shared by recvmsg4 and getpeername4: the socket's connect()
 * translation, else a datagram's. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct mesh_rev_nat_key key;
	struct mesh_rev_nat_value *value;
	struct mesh_sock_rev *r;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 vip, port;

	r = bpf_map_lookup_elem(&mesh_sock_rev, &cookie);
	if (r && r->backend_ip == ctx->user_ip4 && r->backend_port == (__u16)ctx->user_port) {
		vip = r->vip;
		port = r->port;
	} else {
		__builtin_memset(&key, 0, sizeof(key));
		key.cookie = cookie;
		key.backend_ip = ctx->user_ip4;
		key.backend_port = (__u16)ctx->user_port;
		value = bpf_map_lookup_elem(&mesh_rev_nat, &key);
		if (!value)
			return SOCK_ALLOW;
		vip = value->vip;
		port = value->port;
	}
	/* One store of each field (the verifier refuses a ctx pointer the compiler would
	 * offset to share the stores of two branches). */
	ctx->user_ip4 = vip;
	ctx->user_port = port;
	return SOCK_ALLOW;
}

/* Ingress policy of the local endpoint a packet is delivered to, and its flow record. Only
 * the first packet of a flow is checked and reported: a TCP SYN (later packets belong to a
 * connection the SYN was allowed for, or are refused by TCP itself), a UDP datagram unless
 * the socket sent to its source first (a reply). */
static __always_inline int policy_ingress(struct __sk_buff *skb)
{
	struct mesh_ipcache_key dst_key = { .prefixlen = 32 };
	struct mesh_ipcache_value *dst;
	struct mesh_policy_endpoint *ep;
	struct policy_verdict v = { MESH_RULE_NONE, MESH_VERDICT_ALLOW };
	struct mesh_flow_event ev;
	struct iphdr ip;
	__u32 local, remote, l4;
	__u16 ports[2]; /* source, destination: network order */
	__u8 report;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return SOCK_ALLOW;
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0 || ip.version != 4)
		return SOCK_ALLOW;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return SOCK_ALLOW;
	dst_key.ip4 = ip.daddr;
	dst = bpf_map_lookup_elem(&mesh_ipcache, &dst_key);
	local = dst ? dst->identity : MESH_IDENTITY_WORLD;
	ep = bpf_map_lookup_elem(&mesh_policy_endpoints, &local);
	report = dst && (dst->flags & MESH_IPCACHE_F_LOCAL) && events_on();
	if (!ep && !report)
		return SOCK_ALLOW;
	l4 = (__u32)ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
		return SOCK_ALLOW;
	if (ip.protocol == IPPROTO_TCP) {
		__u8 flags;

		/* The flags byte: offset 13 of the TCP header. */
		if (bpf_skb_load_bytes(skb, l4 + 13, &flags, 1) < 0)
			return SOCK_ALLOW;
		if (!(flags & 0x02) || (flags & 0x10)) /* not SYN, or ACK */
			return SOCK_ALLOW;
	} else {
		struct mesh_policy_reply_key key;

		__builtin_memset(&key, 0, sizeof(key));
		key.cookie = bpf_get_socket_cookie(skb);
		key.remote_ip = ip.saddr;
		key.remote_port = ports[0];
		if (bpf_map_lookup_elem(&mesh_policy_replies, &key))
			return SOCK_ALLOW;
	}
	remote = ipcache_identity(ip.saddr);
	if (ep) {
		struct policy_query q = {
			.remote = remote,
			.port = ports[1],
			.proto = ip.protocol,
			.dir = MESH_DIRECTION_INGRESS,
		};

		policy_decide(ep, &q, &v);
		if (v.rule != MESH_RULE_NONE || v.verdict == MESH_VERDICT_DENY ||
		    (ep->flags & MESH_POLICY_F_INGRESS_ENFORCED))
			policy_count(local, remote, MESH_DIRECTION_INGRESS, &v, skb->len);
	}
	if (report || v.verdict == MESH_VERDICT_DENY) {
		__builtin_memset(&ev, 0, sizeof(ev));
		ev.cookie = bpf_get_socket_cookie(skb);
		ev.src_ip = ip.saddr;
		ev.src_port = ports[0];
		ev.src_identity = remote;
		ev.dst_ip = ip.daddr;
		ev.dst_port = ports[1];
		ev.dst_identity = local;
		ev.rule = v.rule;
		ev.direction = MESH_DIRECTION_INGRESS;
		ev.proto = ip.protocol;
		if (v.verdict == MESH_VERDICT_DENY) {
			ev.verdict = MESH_EVENT_DROPPED;
			ev.reason = event_policy_reason(v.rule);
			ev.flags = MESH_EVENT_F_POLICY;
		} else {
			ev.verdict = MESH_EVENT_FORWARDED;
			ev.flags = v.rule ? MESH_EVENT_F_POLICY : 0;
		}
		event_emit(&ev);
	}
	return v.verdict == MESH_VERDICT_DENY ? SOCK_DENY : SOCK_ALLOW;
}

/* ---- passive backend health ---- */

/* The health key of a TCP connection's peer (IPv4 only). */
static __always_inline int health_key_of(struct bpf_sock_ops *skops, struct mesh_health_key *key)
{
	if (skops->family != 2 /* AF_INET */)
		return 0;
	__builtin_memset(key, 0, sizeof(*key));
	key->ip = skops->remote_ip4;
	/* remote_port holds the network-order port in its upper 16 bits (the kernel loads
	 * the be16 and shifts it), so the shift gives it back as mesh_sock_rev stores it. */
	key->port = (__u16)(skops->remote_port >> 16);
	key->proto = IPPROTO_TCP;
	return 1;
}

/* Counts a connect's outcome for the backend `key` names, if socket LB translated the
 * socket (`cookie`) to it (its mesh_sock_rev entry says so): direct connects are not
 * judged. */
static __always_inline void health_count(const struct mesh_health_key *key, __u64 cookie,
					 int ok)
{
	struct mesh_health_value *v;
	struct mesh_sock_rev *r;
	__u64 now;

	r = bpf_map_lookup_elem(&mesh_sock_rev, &cookie);
	if (!r || r->backend_ip != key->ip || r->backend_port != key->port)
		return;
	v = bpf_map_lookup_elem(&mesh_backend_health, key);
	if (!v) {
		struct mesh_health_value init;

		if (ok)
			return;
		__builtin_memset(&init, 0, sizeof(init));
		bpf_map_update_elem(&mesh_backend_health, key, &init, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&mesh_backend_health, key);
		if (!v)
			return;
	}
	now = bpf_ktime_get_boot_ns();
	if (ok) {
		__sync_fetch_and_add(&v->successes, 1);
		v->last_success_ns = now;
	} else {
		__sync_fetch_and_add(&v->failures, 1);
		v->last_failure_ns = now;
	}
}

static __always_inline void health_record(struct bpf_sock_ops *skops, int ok)
{
	struct mesh_health_key key;

	if (!health_key_of(skops, &key))
		return;
	/* A success of a backend with no failure on record heals nothing: no entry, so
	 * healthy traffic neither pays for one (nor for its socket's lookup) nor evicts a
	 * failing backend's. */
	if (ok && !bpf_map_lookup_elem(&mesh_backend_health, &key))
		return;
	health_count(&key, bpf_get_socket_cookie(skops), ok);
}

SEC("sockops")
int mesh_sock_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Ask for state changes and retransmission timeouts of this connect. */
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		health_record(skops, 1);
		/* Established: later state changes and timeouts are not connect failures. */
		bpf_sock_ops_cb_flags_set(skops, 0);
		break;
	case BPF_SOCK_OPS_RTO_CB:
		/* A SYN retransmission: the backend did not answer in time. Reported once: no
		 * more timeout callbacks for this socket. */
		if (skops->state == BPF_TCP_SYN_SENT) {
			health_record(skops, 0);
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[0] == BPF_TCP_SYN_SENT && skops->args[1] == BPF_TCP_CLOSE)
			health_record(skops, 0);
		break;
	}
	return 1;
}

/* A socket's release (the close() of its last descriptor, also at exit): its mesh_sock_rev
 * entry goes, so the LRU holds open sockets only. A TCP connect still in SYN_SENT here is
 * one the application gave up: passive health counts it now, as sock_ops would at
 * SYN_SENT -> CLOSE, which comes after this and no longer finds the entry. */
SEC("cgroup/sock_release")
int mesh_sock_release(struct bpf_sock *sk)
{
	__u64 cookie;

	if (sk->family != 2 /* AF_INET */ ||
	    (sk->protocol != IPPROTO_TCP && sk->protocol != IPPROTO_UDP))
		return 1;
	cookie = bpf_get_socket_cookie(sk);
	if (sk->protocol == IPPROTO_TCP && sk->state == BPF_TCP_SYN_SENT) {
		struct mesh_health_key key;

		__builtin_memset(&key, 0, sizeof(key));
		key.ip = sk->dst_ip4;
		key.port = (__u16)sk->dst_port;
		key.proto = IPPROTO_TCP;
		health_count(&key, cookie, 0);
	}
	bpf_map_delete_elem(&mesh_sock_rev, &cookie);
	return 1;
}

SEC("cgroup/connect4")
int mesh_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx, 1);
}

SEC("cgroup/sendmsg4")
int mesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx, 0);
}

SEC("cgroup/recvmsg4")
int mesh_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int mesh_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup_skb/ingress")
int mesh_policy_ingress(struct __sk_buff *skb)
{
	return policy_ingress(skb);
}

char LICENSE[] SEC("license") = "GPL";
