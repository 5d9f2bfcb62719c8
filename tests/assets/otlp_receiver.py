#!/usr/bin/env python3
"""An OTLP trace receiver for the tests: decodes the real protobuf messages
(the opentelemetry-proto package) received over gRPC (grpcio,
TraceService/Export) or HTTP/protobuf (POST /v1/traces), and appends one
JSON line per span to OUT: trace and span ids in hex, parent, name, kind,
service.name of its resource, and attributes.

Usage: otlp_receiver.py grpc|http ADDR:PORT OUT
"""
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def write(out, request):
    lines = []
    for rs in request.resource_spans:
        resource = {a.key: value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "status": s.status.code,
                    "service": resource.get("service.name"),
                    "resource": resource,
                    "scope": ss.scope.name,
                    "attributes": {a.key: value(a.value) for a in s.attributes},
                }))
    with LOCK, open(out, "a") as f:
        for line in lines:
            f.write(line + "\n")


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        write(self.out, request)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    mode, addr, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "grpc":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(out), server)
        server.add_insecure_port(addr)
        server.start()
        print(f"otlp grpc receiver on {addr}", file=sys.stderr, flush=True)
        server.wait_for_termination()
        return

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
            if ok:
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                write(out, request)
            self.send_response(200 if ok else 400)
            self.send_header("content-type", "application/x-protobuf")
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    host, port = addr.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"otlp http receiver on {addr}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
