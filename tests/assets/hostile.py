#!/usr/bin/env python3
"""Hostile clients of the tunnel port, and a well-behaved one to time, for
the hostile-client test (tests/tests/hostile.rs). Each prints one JSON line.

  hostile.py idle HOST PORT N SECONDS
      opens N TCP connections that never send a byte and holds them for up
      to SECONDS (or until every one is closed): {"connected", "refused",
      "closed", "open", "close_s_p50", "close_s_max"} (close times from
      each connection's establishment).
  hostile.py slowloris HOST PORT N SECONDS
      N connections that send a TLS ClientHello one byte a second:
      {"connected", "closed", "open", "bytes_sent_max", "close_s_max"}.
  hostile.py halfopen HOST PORT N
      N connections that send the first bytes of a ClientHello, then shut
      their sending side: {"connected", "closed", "open", "close_s_max"}.
  hostile.py tls HOST PORT [--sni NAME] [--alpn PROTO] [--cert C --key K]
      one TLS handshake (certificate not checked: this is a hostile
      client): {"ok", "alpn", "error"}.
  hostile.py connect HOST PORT --cert C --key K CASES_JSON
      one mTLS + HTTP/2 connection (python-hyper's h2), then per case of the
      JSON list ({"method", "authority", "header_bytes", "sleep"}) one stream
      (after "sleep" seconds):
      [{"status", "reason", "reset", "error"}], then {"goaway"}.
  hostile.py resets HOST PORT --cert C --key K N
      one mTLS + HTTP/2 connection that opens and at once resets N CONNECT
      streams (the "rapid reset" attack): {"sent", "goaway", "error"}.
  hostile.py echo HOST PORT N
      the well-behaved client: N sequential connections, each sending 64
      bytes and reading them back: {"ok", "failed", "error", "ms_p50",
      "ms_p99", "ms_max"}.
"""
import json
import resource
import selectors
import socket
import ssl
import sys
import time

# A ClientHello's first bytes: a TLS record header (handshake, TLS 1.0
# record version, length 512) and the start of a ClientHello.
CLIENT_HELLO_START = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03]) + bytes(range(32))


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


class Conns:
    """Non-blocking connections watched with epoll until the peer closes."""

    def __init__(self, host, port, n):
        self.sel = selectors.DefaultSelector()
        self.connected, self.refused, self.closed = 0, 0, 0
        self.since, self.close_s = {}, []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((host, port))
            self.sel.register(s, selectors.EVENT_WRITE, "connecting")

    def open(self):
        return len(self.sel.get_map())

    def poll(self, timeout, on_connected=None):
        for key, _ in self.sel.select(timeout):
            s = key.fileobj
            if key.data == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.refused += 1
                    self.sel.unregister(s)
                    s.close()
                    continue
                self.connected += 1
                self.since[s.fileno()] = time.monotonic()
                self.sel.modify(s, selectors.EVENT_READ, "open")
                if on_connected:
                    on_connected(s)
                continue
            try:
                data = s.recv(65536)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                self.close_s.append(time.monotonic() - self.since.pop(s.fileno()))
                self.closed += 1
                self.sel.unregister(s)
                s.close()

    def sockets(self):
        return [k.fileobj for k in self.sel.get_map().values() if k.data == "open"]


def idle(host, port, n, seconds):
    raise_nofile()
    conns = Conns(host, port, n)
    deadline = time.monotonic() + seconds
    while conns.open() and time.monotonic() < deadline:
        conns.poll(0.2)
    print(json.dumps({
        "connected": conns.connected, "refused": conns.refused, "closed": conns.closed, "open": conns.open(),
        "close_s_p50": percentile(conns.close_s, 0.5), "close_s_max": max(conns.close_s, default=None),
    }))


def slowloris(host, port, n, seconds):
    raise_nofile()
    conns = Conns(host, port, n)
    sent = {}
    deadline = time.monotonic() + seconds
    next_byte = time.monotonic()
    while conns.open() and time.monotonic() < deadline:
        conns.poll(0.1)
        if time.monotonic() >= next_byte:
            next_byte += 1.0
            for s in conns.sockets():
                i = sent.get(s.fileno(), 0)
                try:
                    s.send(CLIENT_HELLO_START[i % len(CLIENT_HELLO_START):][:1])
                    sent[s.fileno()] = i + 1
                except OSError:
                    pass
    print(json.dumps({
        "connected": conns.connected, "closed": conns.closed, "open": conns.open(),
        "bytes_sent_max": max(sent.values(), default=0), "close_s_max": max(conns.close_s, default=None),
    }))


def halfopen(host, port, n):
    def send_and_shut(s):
        try:
            s.send(CLIENT_HELLO_START)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    conns = Conns(host, port, n)
    deadline = time.monotonic() + 30
    while conns.open() and time.monotonic() < deadline:
        conns.poll(0.1, send_and_shut)
    print(json.dumps({
        "connected": conns.connected, "closed": conns.closed, "open": conns.open(),
        "close_s_max": max(conns.close_s, default=None),
    }))


def client_context(cert=None, key=None, alpn=("h2",)):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def tls(host, port, sni, alpn, cert, key):
    ctx = client_context(cert, key, (alpn,) if alpn else None)
    try:
        with socket.create_connection((host, port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=sni) as s:
                # TLS 1.3: a refused client certificate shows on the first read.
                s.settimeout(2)
                try:
                    s.recv(1)
                except socket.timeout:
                    pass
                print(json.dumps({"ok": True, "alpn": s.selected_alpn_protocol(), "error": None}))
    except (OSError, ssl.SSLError) as e:
        print(json.dumps({"ok": False, "alpn": None, "error": repr(e)}))


def h2_connection(host, port, cert, key):
    import h2.config
    import h2.connection

    raw = socket.create_connection((host, port), timeout=10)
    s = client_context(cert, key).wrap_socket(raw, server_hostname=host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


class Frames:
    """Feeds the server's bytes to `conn` one HTTP/2 frame at a time, so the
    events of frames before one h2 refuses (such as a PING after a graceful
    GOAWAY, which the peer may send but h2 rejects) are not lost."""

    def __init__(self, conn):
        self.conn, self.pending, self.refused = conn, b"", None

    def feed(self, data):
        self.pending += data
        events = []
        while self.refused is None and len(self.pending) >= 9:
            n = 9 + int.from_bytes(self.pending[:3], "big")
            if len(self.pending) < n:
                break
            frame, self.pending = self.pending[:n], self.pending[n:]
            try:
                events += self.conn.receive_data(frame)
            except Exception as e:
                self.refused = repr(e)
        return events


def connect_cases(host, port, cert, key, cases):
    import h2.events

    s, conn = h2_connection(host, port, cert, key)
    frames = Frames(conn)
    results, goaway = [], None
    for case in cases:
        # A pause first (the tunnel stays open, idle), e.g. to outlive a
        # certificate.
        time.sleep(case.get("sleep", 0))
        sid = conn.get_next_available_stream_id()
        method = case.get("method", "CONNECT")
        headers = [(":method", method), (":authority", case["authority"])]
        if method != "CONNECT":
            headers += [(":scheme", "https"), (":path", "/")]
        if case.get("header_bytes"):
            headers.append(("x-oversized", "a" * case["header_bytes"]))
        result = {"status": None, "reason": None, "reset": None, "error": None}
        try:
            conn.send_headers(sid, headers, end_stream=False)
            s.sendall(conn.data_to_send())
            deadline = time.monotonic() + 10
            done = False
            while not done and time.monotonic() < deadline:
                data = s.recv(65536)
                if not data:
                    result["error"] = "connection closed"
                    break
                for ev in frames.feed(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        h = dict(ev.headers)
                        result["status"] = int(h.get(":status", 0))
                        result["reason"] = h.get("heddle-reason")
                        done = True
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        result["reset"] = int(ev.error_code)
                        done = True
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        goaway = int(ev.error_code)
                        done = True
                if frames.refused is not None and not done:
                    result["error"] = frames.refused
                    break
                s.sendall(conn.data_to_send())
            if result["status"] == 200:
                conn.reset_stream(sid)
                s.sendall(conn.data_to_send())
        except Exception as e:  # a hostile client reports, it does not stop
            result["error"] = repr(e)
        results.append(result)
        if goaway is not None:
            break
    print(json.dumps({"cases": results, "goaway": goaway}))


def read_goaway(s, conn):
    """Reads one chunk: (GOAWAY error code or None, "connection closed" or None)."""
    import h2.events

    data = s.recv(65536)
    if not data:
        return None, "connection closed"
    codes = [int(ev.error_code) for ev in conn.receive_data(data) if isinstance(ev, h2.events.ConnectionTerminated)]
    return (codes[-1] if codes else None), None


def rapid_resets(host, port, cert, key, n, authority):
    s, conn = h2_connection(host, port, cert, key)
    sent, goaway, error = 0, None, None
    s.settimeout(0.001)
    try:
        for _ in range(n):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
            conn.reset_stream(sid)
            s.sendall(conn.data_to_send())
            sent += 1
            try:
                goaway, error = read_goaway(s, conn)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            if goaway is not None or error is not None:
                break
        s.settimeout(5)
        while goaway is None and error is None:
            goaway, error = read_goaway(s, conn)
    except Exception as e:
        error = error or repr(e)
    print(json.dumps({"sent": sent, "goaway": goaway, "error": error}))


def echo(host, port, n):
    payload = bytes(range(64))
    ok, failed, first, ms = 0, 0, None, []
    for _ in range(n):
        started = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(len(payload) - len(got))
                    if not chunk:
                        break
                    got += chunk
            if got != payload:
                raise OSError(f"echoed {len(got)} of {len(payload)} bytes")
            ok += 1
            ms.append((time.monotonic() - started) * 1000)
        except OSError as e:
            failed += 1
            first = first or repr(e)
    print(json.dumps({
        "ok": ok, "failed": failed, "error": first,
        "ms_p50": percentile(ms, 0.5), "ms_p99": percentile(ms, 0.99), "ms_max": max(ms, default=None),
    }))


def option(args, name, default=None):
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i:i + 2]
        return value
    return default


def main():
    args = sys.argv[1:]
    mode, host, port = args[0], args[1], int(args[2])
    rest = args[3:]
    if mode == "idle":
        idle(host, port, int(rest[0]), float(rest[1]))
    elif mode == "slowloris":
        slowloris(host, port, int(rest[0]), float(rest[1]))
    elif mode == "halfopen":
        halfopen(host, port, int(rest[0]))
    elif mode == "tls":
        sni, alpn = option(rest, "--sni"), option(rest, "--alpn")
        cert, key = option(rest, "--cert"), option(rest, "--key")
        tls(host, port, sni, alpn, cert, key)
    elif mode == "connect":
        cert, key = option(rest, "--cert"), option(rest, "--key")
        connect_cases(host, port, cert, key, json.loads(rest[0]))
    elif mode == "resets":
        cert, key = option(rest, "--cert"), option(rest, "--key")
        authority = option(rest, "--authority", f"{host}:8080")
        rapid_resets(host, port, cert, key, int(rest[0]), authority)
    elif mode == "echo":
        echo(host, port, int(rest[0]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
