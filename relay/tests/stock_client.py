#!/usr/bin/env python3
"""A generic gRPC client of the Observer API that shares no code with Lumen: gRPC C-core
(grpcio) and Google's protobuf runtime, with every message type learnt from the server's
gRPC reflection (as grpcurl does). Prints one JSON object per line:

  stock_client.py ADDRESS flows REQUEST_JSON   -> each GetFlowsResponse, then {"end": "OK"}
  stock_client.py ADDRESS status               -> the ServerStatusResponse
  stock_client.py ADDRESS nodes                -> the GetNodesResponse

An RPC error prints {"error": CODE_NAME, "details": ...} and exits 0, so the caller checks it.
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def message_class(pool, name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def dump(msg):
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def main():
    address, what = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(address)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    # The service must be described too (methods and their types), not only messages.
    service = pool.FindServiceByName("observer.Observer")
    methods = {m.name: m for m in service.methods}

    def call(method, request, stream):
        m = methods[method]
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        path = f"/observer.Observer/{method}"
        kind = channel.unary_stream if stream else channel.unary_unary
        rpc = kind(path, request_serializer=req_cls.SerializeToString,
                   response_deserializer=resp_cls.FromString)
        return rpc(json_format.Parse(request, req_cls()), timeout=30)

    try:
        if what == "flows":
            for r in call("GetFlows", sys.argv[3], True):
                print(json.dumps(dump(r)), flush=True)
            print(json.dumps({"end": "OK"}), flush=True)
        elif what == "status":
            print(json.dumps(dump(call("ServerStatus", "{}", False))), flush=True)
        elif what == "nodes":
            print(json.dumps(dump(call("GetNodes", "{}", False))), flush=True)
        else:
            raise SystemExit(f"unknown command {what!r}")
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "details": e.details()}), flush=True)


if __name__ == "__main__":
    main()
