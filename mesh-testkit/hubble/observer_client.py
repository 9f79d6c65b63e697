"""An independent Observer client: Python grpcio over modules that protoc generated from
proto/proto/{flow,observer,relay}/*.proto (Hubble's API as mesh publishes it), nothing
shared with the Rust code. Reads ServerStatus and GetFlows and prints one JSON document.

usage: observer_client.py GENERATED_DIR ADDRESS CA CERT KEY NUMBER [--all-clusters]
                          [--server-name NAME]

--server-name is the name checked against the server certificate's DNS names (grpcio checks
one, as Hubble's CLI does with --tls-server-name): an agent's certificate names
NODE.CLUSTER.hubble-grpc.mesh.
"""
import argparse
import json
import sys


def main():
    p = argparse.ArgumentParser()
    for a in ("generated", "address", "ca", "cert", "key"):
        p.add_argument(a)
    p.add_argument("number", type=int)
    p.add_argument("--all-clusters", action="store_true")
    p.add_argument("--server-name")
    args = p.parse_args()
    sys.path.insert(0, args.generated)

    import grpc
    from google.protobuf import json_format
    from observer import observer_pb2, observer_pb2_grpc

    read = lambda p: open(p, "rb").read()  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
    options = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    metadata = [("x-mesh-scope", "all-clusters")] if args.all_clusters else []
    with grpc.secure_channel(args.address, creds, options=options) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), metadata=metadata, timeout=20)
        flows = []
        for resp in stub.GetFlows(
            observer_pb2.GetFlowsRequest(number=args.number), metadata=metadata, timeout=20
        ):
            flows.append(json_format.MessageToDict(resp, preserving_proto_field_name=True))
        out = {
            "status": json_format.MessageToDict(status, preserving_proto_field_name=True),
            "responses": flows,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
