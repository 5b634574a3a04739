#!/usr/bin/env python3
"""An independent OTLP receiver for Lumen's export tests and benchmark.

Built only from the published `opentelemetry-proto` Python package and
`grpcio` (no Lumen code): it serves OTLP/gRPC (LogsService, MetricsService)
and OTLP/HTTP with protobuf bodies (POST /v1/logs, /v1/metrics), decodes every
request and appends what it received to a JSON-lines file:

  {"signal": "request", "kind": "logs"|"metrics", "transport": "grpc"|"http",
   "items": N, "headers": {...}}
  {"signal": "log", "resource": {...}, "scope": "...", "time_unix_nano": ...,
   "observed_time_unix_nano": ..., "severity_number": ..., "severity_text": ...,
   "event_name": ..., "trace_id": "hex", "body": ..., "attributes": {...}}
  {"signal": "metric", "name": ..., "unit": ..., "type": "sum"|"histogram"|"gauge",
   "monotonic": bool, "temporality": N, "resource": {...}, "attributes": {...},
   "value": ... | "count": N, "sum": x, "bucket_counts": [...],
   "explicit_bounds": [...]}

With --discard it decodes nothing and only answers (for benchmarks).
It prints "READY grpc=PORT http=PORT" once listening.

Requirements: pip install grpcio==1.85.1 opentelemetry-proto==1.45.2
"""

import argparse
import http.server
import json
import signal
import ssl
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

LOCK = threading.Lock()
OUT = None


def emit(obj):
    line = json.dumps(obj, sort_keys=True)
    with LOCK:
        OUT.write(line + "\n")
        OUT.flush()


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return None


def attributes(kvs):
    out = {}
    for kv in kvs:
        if kv.key in out:
            out.setdefault("__duplicate_keys__", []).append(kv.key)
        out[kv.key] = any_value(kv.value)
    return out


def record_logs(req, transport, headers):
    n = 0
    for rl in req.resource_logs:
        resource = attributes(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                n += 1
                emit({
                    "signal": "log",
                    "resource": resource,
                    "scope": sl.scope.name,
                    "scope_version": sl.scope.version,
                    "time_unix_nano": r.time_unix_nano,
                    "observed_time_unix_nano": r.observed_time_unix_nano,
                    "severity_number": r.severity_number,
                    "severity_text": r.severity_text,
                    "event_name": r.event_name,
                    "trace_id": r.trace_id.hex(),
                    "body": any_value(r.body),
                    "attributes": attributes(r.attributes),
                })
    emit({"signal": "request", "kind": "logs", "transport": transport, "items": n, "headers": headers})


def number(dp):
    kind = dp.WhichOneof("value")
    return dp.as_int if kind == "as_int" else dp.as_double


def record_metrics(req, transport, headers):
    n = 0
    for rm in req.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                base = {"signal": "metric", "name": m.name, "unit": m.unit, "resource": resource,
                        "scope": sm.scope.name, "type": kind}
                if kind == "sum":
                    for dp in m.sum.data_points:
                        n += 1
                        emit(dict(base, monotonic=m.sum.is_monotonic,
                                  temporality=m.sum.aggregation_temporality,
                                  attributes=attributes(dp.attributes), value=number(dp),
                                  time_unix_nano=dp.time_unix_nano))
                elif kind == "gauge":
                    for dp in m.gauge.data_points:
                        n += 1
                        emit(dict(base, attributes=attributes(dp.attributes), value=number(dp),
                                  time_unix_nano=dp.time_unix_nano))
                elif kind == "histogram":
                    for dp in m.histogram.data_points:
                        n += 1
                        emit(dict(base, temporality=m.histogram.aggregation_temporality,
                                  attributes=attributes(dp.attributes), count=dp.count, sum=dp.sum,
                                  bucket_counts=list(dp.bucket_counts),
                                  explicit_bounds=list(dp.explicit_bounds),
                                  time_unix_nano=dp.time_unix_nano))
    emit({"signal": "request", "kind": "metrics", "transport": transport, "items": n, "headers": headers})


INTERESTING_HEADERS = ("authorization", "x-tenant", "content-type", "user-agent")


def grpc_headers(context):
    return {k: v for k, v in context.invocation_metadata() if k in INTERESTING_HEADERS}


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        record_logs(request, "grpc", grpc_headers(context))
        return logs_service_pb2.ExportLogsServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        record_metrics(request, "grpc", grpc_headers(context))
        return metrics_service_pb2.ExportMetricsServiceResponse()


class Discard(grpc.GenericRpcHandler):
    """Answers every Export with an empty response without decoding."""

    def service(self, handler_call_details):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: b"")


class HttpHandler(http.server.BaseHTTPRequestHandler):
    discard = False
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() in INTERESTING_HEADERS}
        if self.path.endswith("/v1/logs"):
            if not self.discard:
                record_logs(logs_service_pb2.ExportLogsServiceRequest.FromString(body), "http", headers)
            reply = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
        elif self.path.endswith("/v1/metrics"):
            if not self.discard:
                record_metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body), "http", headers)
            reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        else:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


def main():
    global OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/dev/null", help="JSON-lines file to append to")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=0, help="0: any free port")
    p.add_argument("--http-port", type=int, default=0, help="0: any free port, -1: no HTTP")
    p.add_argument("--tls-cert", help="PEM certificate: serve TLS on both ports")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--discard", action="store_true", help="answer without decoding")
    args = p.parse_args()
    OUT = open(args.out, "a", encoding="utf-8")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    if args.discard:
        server.add_generic_rpc_handlers((Discard(),))
    else:
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    address = f"{args.host}:{args.grpc_port}"
    if args.tls_cert:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        grpc_port = server.add_secure_port(address, creds)
    else:
        grpc_port = server.add_insecure_port(address)
    if grpc_port == 0:
        print(f"cannot listen on {address}", file=sys.stderr, flush=True)
        sys.exit(2)
    server.start()

    http_port = -1
    if args.http_port >= 0:
        HttpHandler.discard = args.discard
        httpd = http.server.ThreadingHTTPServer((args.host, args.http_port), HttpHandler)
        httpd.daemon_threads = True
        if args.tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        http_port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()

    print(f"READY grpc={grpc_port} http={http_port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=None)


if __name__ == "__main__":
    main()
