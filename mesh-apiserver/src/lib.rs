//! mesh-apiserver: watches its cluster, publishes into etcd, serves over mutual-TLS gRPC.
