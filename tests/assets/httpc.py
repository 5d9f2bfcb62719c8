#!/usr/bin/env python3
"""HTTP clients the waypoint tests run inside pods (standard library only).

  httpc.py load URL N [--header K:V ...] [--method M] [--body BYTES]
      N requests on one keep-alive connection (GET without a body unless
      told; "{i}" in URL becomes the request's index); prints {"served_by": {pod: n}, "status": {code: n},
      "errors": n, "error": "first error", "max_ms": slowest request}.
  httpc.py cases FILE                      runs each request of the JSON
      list in FILE ({"method","url","headers","body"}) on its own
      connection; prints one JSON result per case: status, headers
      (lower-case), body (parsed JSON when it is JSON).
  httpc.py upgrade HOST PORT TEXT          HTTP/1.1 Upgrade to /ws, then
      sends TEXT and prints what came back after the 101.
"""
import http.client
import json
import socket
import sys
import time
import urllib.parse


def connect(url):
    u = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10), u


def load(url, n, headers, method="GET", body=None):
    conn, u = connect(url)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    served, status, errors, first, max_ms = {}, {}, 0, None, 0.0
    for i in range(n):
        try:
            started = time.monotonic()
            conn.request(method, path.replace("%7Bi%7D", str(i)).replace("{i}", str(i)), body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            max_ms = max(max_ms, (time.monotonic() - started) * 1000)
            who = r.getheader("x-served-by") or "-"
            served[who] = served.get(who, 0) + 1
            status[str(r.status)] = status.get(str(r.status), 0) + 1
        except Exception as e:  # a failed request is counted, and we reconnect
            errors += 1
            first = first or repr(e)
            conn.close()
            conn, _ = connect(url)
    print(json.dumps({"served_by": served, "status": status, "errors": errors, "error": first, "max_ms": max_ms}))


def cases(path):
    out = []
    for case in json.load(open(path)):
        conn, u = connect(case["url"])
        target = (u.path or "/") + ("?" + u.query if u.query else "")
        try:
            conn.request(case.get("method", "GET"), target, body=case.get("body"), headers=case.get("headers", {}))
            r = conn.getresponse()
            raw = r.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            out.append({"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()}, "body": body})
        except Exception as e:
            out.append({"status": 0, "error": repr(e)})
        finally:
            conn.close()
    print(json.dumps(out))


def upgrade(host, port, text):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(("GET /ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n" % host).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    status_line, _, rest = head.partition(b"\r\n")
    _, _, after = head.partition(b"\r\n\r\n")
    s.sendall(text.encode())
    got = after
    while len(got) < len(text):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    print(json.dumps({"status_line": status_line.decode(), "echo": got.decode("utf-8", "replace")}))


def main():
    cmd = sys.argv[1]
    if cmd == "load":
        headers, method, body = {}, "GET", None
        args = sys.argv[4:]
        for i, a in enumerate(args):
            if a == "--header":
                k, v = args[i + 1].split(":", 1)
                headers[k] = v
            elif a == "--method":
                method = args[i + 1]
            elif a == "--body":
                body = b"x" * int(args[i + 1])
        load(sys.argv[2], int(sys.argv[3]), headers, method, body)
    elif cmd == "cases":
        cases(sys.argv[2])
    elif cmd == "upgrade":
        upgrade(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
