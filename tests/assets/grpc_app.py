#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for the waypoint tests, without
generated code: service heddle.test.Echo with a unary method `Unary` and a
bidirectional streaming method `Chat`, messages are raw bytes.

  grpc_app.py serve PORT NAME       answers "NAME:<request>" (Unary) and
                                    echoes each message as "NAME:<msg>" (Chat);
                                    `Fail` aborts with UNAVAILABLE; `Slow`
                                    answers after 2 s.
  grpc_app.py call HOST:PORT N M    N unary calls, then one Chat stream of M
                                    messages; prints JSON {unary: {...},
                                    chat: [...], chat_ok, failed_status}.
  grpc_app.py slow HOST:PORT        one `Slow` call (10 s deadline); prints
                                    JSON {status, ms}.
"""
import json
import sys
import time
from concurrent import futures

import grpc

SERVICE = "heddle.test.Echo"
ident = lambda b: b


def serve(port, name):
    def unary(request, context):
        return name.encode() + b":" + request

    def chat(requests, context):
        for r in requests:
            yield name.encode() + b":" + r

    def fail(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")

    def slow(request, context):
        time.sleep(2)
        return name.encode() + b":slow"

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, ident, ident),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("0.0.0.0:%s" % port)
    server.start()
    print("grpc: %s listening on %s" % (name, port), file=sys.stderr, flush=True)
    server.wait_for_termination()


def call(target, n, m):
    channel = grpc.insecure_channel(target)
    unary = channel.unary_unary("/%s/Unary" % SERVICE, request_serializer=ident, response_deserializer=ident)
    chat = channel.stream_stream("/%s/Chat" % SERVICE, request_serializer=ident, response_deserializer=ident)
    fail = channel.unary_unary("/%s/Fail" % SERVICE, request_serializer=ident, response_deserializer=ident)
    served = {}
    for i in range(n):
        reply = unary(b"ping-%d" % i, timeout=10).decode()
        who = reply.split(":", 1)[0]
        served[who] = served.get(who, 0) + 1

    def messages():
        for i in range(m):
            yield b"msg-%d" % i
            time.sleep(0.01)

    got = [r.decode() for r in chat(messages(), timeout=20)]
    ok = len(got) == m and all(g.endswith(":msg-%d" % i) for i, g in enumerate(got))
    try:
        fail(b"x", timeout=10)
        failed = "OK"
    except grpc.RpcError as e:
        failed = e.code().name
    print(json.dumps({"unary": served, "chat": got[:3], "chat_ok": ok, "failed_status": failed}))


def slow_call(target):
    channel = grpc.insecure_channel(target)
    slow = channel.unary_unary("/%s/Slow" % SERVICE, request_serializer=ident, response_deserializer=ident)
    started = time.monotonic()
    try:
        slow(b"x", timeout=10)
        status = "OK"
    except grpc.RpcError as e:
        status = e.code().name
    print(json.dumps({"status": status, "ms": (time.monotonic() - started) * 1000}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "slow":
        slow_call(sys.argv[2])
    else:
        call(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
