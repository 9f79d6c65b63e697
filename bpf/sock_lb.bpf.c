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
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "mesh.h"

#define SOCK_ALLOW 1
#define SOCK_DENY 0

enum xlate_result {
	XLATE_NOT_SERVICE = 0,
	XLATE_DONE = 1,
	XLATE_NO_BACKEND = 2,
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

/* Picks a backend for (vip, port, proto). On XLATE_DONE *out holds it. */
static __always_inline enum xlate_result
select_backend(__u32 vip, __u16 port, __u8 proto, struct mesh_backend_value *out)
{
	struct mesh_service_key key;
	struct mesh_service_value *master, *slot_entry;
	struct mesh_backend_value *backend;
	__u32 backend_id;
	__u16 count, slot;

	service_key_init(&key, vip, port, proto, 0);
	master = bpf_map_lookup_elem(&mesh_services, &key);
	if (!master)
		return XLATE_NOT_SERVICE;
	count = master->count;
	if (count == 0)
		return XLATE_NO_BACKEND;

	slot = (__u16)(bpf_get_prandom_u32() % count) + 1;
	key.slot = slot;
	slot_entry = bpf_map_lookup_elem(&mesh_services, &key);
	/* The agent writes slots before the count, so a missing slot means a
	 * broken map: fail closed rather than connect somewhere unexpected. */
	if (!slot_entry)
		return XLATE_NO_BACKEND;
	backend_id = slot_entry->backend_id;
	backend = bpf_map_lookup_elem(&mesh_backends, &backend_id);
	if (!backend)
		return XLATE_NO_BACKEND;
	*out = *backend;
	return XLATE_DONE;
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

/* Forward translation shared by connect4 and sendmsg4. */
static __always_inline int sock4_forward(struct bpf_sock_addr *ctx)
{
	struct mesh_backend_value backend;
	__u32 vip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	__u8 proto = (__u8)ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SOCK_ALLOW;

	switch (select_backend(vip, port, proto, &backend)) {
	case XLATE_NOT_SERVICE:
		return SOCK_ALLOW;
	case XLATE_NO_BACKEND:
		return SOCK_DENY;
	case XLATE_DONE:
		break;
	}

	record_rev_nat(ctx, &backend, vip, port);
	ctx->user_ip4 = backend.ip;
	ctx->user_port = (__u32)backend.port;
	return SOCK_ALLOW;
}

/* Reverse translation shared by recvmsg4 and getpeername4. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct mesh_rev_nat_key key;
	struct mesh_rev_nat_value *value;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.backend_ip = ctx->user_ip4;
	key.backend_port = (__u16)ctx->user_port;
	value = bpf_map_lookup_elem(&mesh_rev_nat, &key);
	if (value) {
		ctx->user_ip4 = value->vip;
		ctx->user_port = (__u32)value->port;
	}
	return SOCK_ALLOW;
}

SEC("cgroup/connect4")
int mesh_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
}

SEC("cgroup/sendmsg4")
int mesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
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

char LICENSE[] SEC("license") = "GPL";
