"""An independent Observer client: Python grpcio over modules that protoc generated from
proto/proto/{flow,observer,relay}/*.proto (Hubble's API as mesh publishes it), nothing
shared with the Rust code. Reads ServerStatus and GetFlows and prints one JSON document.

usage: observer_client.py GENERATED_DIR ADDRESS CA CERT KEY NUMBER [all-clusters]
"""
import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from observer import observer_pb2, observer_pb2_grpc  # noqa: E402


def main():
    _, _, address, ca, cert, key, number, *rest = sys.argv
    read = lambda p: open(p, "rb").read()  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    metadata = [("x-mesh-scope", "all-clusters")] if rest == ["all-clusters"] else []
    with grpc.secure_channel(address, creds) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), metadata=metadata, timeout=20)
        flows = []
        for resp in stub.GetFlows(
            observer_pb2.GetFlowsRequest(number=int(number)), metadata=metadata, timeout=20
        ):
            flows.append(json_format.MessageToDict(resp, preserving_proto_field_name=True))
        out = {
            "status": json_format.MessageToDict(status, preserving_proto_field_name=True),
            "responses": flows,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
