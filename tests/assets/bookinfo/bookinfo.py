#!/usr/bin/env python3
"""Bookinfo's Python services and its client, for Heddle's test bed.

Istio's Bookinfo, rebuilt small: productpage calls details and reviews;
reviews v2 and v3 call ratings. This file holds productpage, details and
ratings (Python's standard library only); reviews is Rust
(`pod-app reviews`, heddle_tests::bookinfo::reviews). Every service
forwards the headers Istio's Bookinfo forwards (trace context, request id,
end-user), so the mesh can route by user and join one request's spans into
one trace. Nothing here knows about the mesh: services are reached by
their Service address, as an application would.

    bookinfo.py productpage PORT --name POD --details ADDR --reviews ADDR
                [--reviews-timeout SECONDS]
    bookinfo.py details PORT --name POD
    bookinfo.py ratings PORT --name POD
    bookinfo.py get URL [--header K:V]...     one request, JSON result
    bookinfo.py load URL N [--header K:V]...  N keep-alive requests to
                                              productpage, counted by what
                                              the page showed

productpage answers 200 with a JSON page even when a dependency fails, as
the real one renders an error box: `reviews_error` is "Sorry, product
reviews are currently unavailable for this book." when reviews failed or
did not answer within --reviews-timeout (Istio's productpage waits 3 s and
retries once; 1 s here, so the walkthrough does not wait).
"""

import argparse
import http.client
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FORWARDED = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "end-user",
    "user-agent",
]

PRODUCT = {"id": 0, "title": "The Comedy of Errors"}
DETAILS = {
    "id": 0,
    "author": "William Shakespeare",
    "year": 1595,
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
}
RATINGS = {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."


def call(addr, host, path, incoming, timeout):
    """GET http://addr/path with the forwarded headers: (status, JSON body)."""
    ip, port = addr.rsplit(":", 1)
    headers = {"Host": host}
    for name in FORWARDED:
        value = incoming.get(name)
        if value is not None:
            headers[name] = value
    conn = http.client.HTTPConnection(ip, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, {"text": body.decode("utf-8", "replace")}
    finally:
        conn.close()


def handler(role, args):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are two writes: without this, Nagle and the
        # peer's delayed ACK add 40 ms to every answer.
        disable_nagle_algorithm = True

        def log_message(self, *_):
            pass

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-served-by", args.name)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if role == "details" and path.startswith("/details/"):
                self.answer(200, dict(DETAILS, podname=args.name))
            elif role == "ratings" and path.startswith("/ratings/"):
                self.answer(200, dict(RATINGS, podname=args.name))
            elif role == "productpage" and path == "/productpage":
                self.answer(200, self.productpage())
            elif path == "/health":
                self.answer(200, {"status": role + " is healthy"})
            else:
                self.answer(404, {"error": "no such page: " + path})

        def productpage(self):
            page = {"product": PRODUCT, "podname": args.name, "user": self.headers.get("end-user")}
            try:
                status, body = call(args.details, "details:9080", "/details/0", self.headers, 2.0)
                if status == 200:
                    page["details"] = body
                else:
                    page["details_error"] = DETAILS_UNAVAILABLE
                    page["details_status"] = status
            except OSError as e:
                page["details_error"] = DETAILS_UNAVAILABLE
                page["details_status"] = str(e)
            try:
                status, body = call(args.reviews, "reviews:9080", "/reviews/0", self.headers, args.reviews_timeout)
                if status == 200:
                    page["reviews"] = body
                else:
                    page["reviews_error"] = REVIEWS_UNAVAILABLE
                    page["reviews_status"] = status
            except OSError as e:  # socket.timeout is an OSError
                page["reviews_error"] = REVIEWS_UNAVAILABLE
                page["reviews_status"] = "timeout" if "timed out" in str(e) else str(e)
            return page

    return Handler


def serve(role, args):
    server = ThreadingHTTPServer(("0.0.0.0", args.port), handler(role, args))
    server.daemon_threads = True
    print(f"bookinfo {role} ({args.name}) listening on {args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


def parse_headers(pairs):
    out = {}
    for pair in pairs:
        name, _, value = pair.partition(":")
        out[name.strip()] = value.strip()
    return out


def target(url):
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    return hostport, "/" + path


def page_kind(page):
    """What a person sees on the page: reviews v1 (no stars), v2 (black
    stars), v3 (red stars), ratings unavailable, or reviews unavailable."""
    if "reviews" not in page:
        return "reviews-unavailable"
    reviews = page["reviews"]
    return reviews.get("version", "?")


def stars(page):
    reviews = page.get("reviews") or {}
    colors = {r.get("rating", {}).get("color") for r in reviews.get("reviews", [])}
    errors = {r.get("rating", {}).get("error") for r in reviews.get("reviews", [])} - {None}
    if errors:
        return "ratings-unavailable"
    colors.discard(None)
    return ",".join(sorted(colors)) or "none"


def get(args):
    hostport, path = target(args.url)
    ip, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(ip, int(port), timeout=30)
    started = time.monotonic()
    conn.request("GET", path, headers=dict(parse_headers(args.header), Host=args.host or hostport))
    resp = conn.getresponse()
    body = resp.read()
    elapsed = (time.monotonic() - started) * 1000
    try:
        body = json.loads(body)
    except ValueError:
        body = body.decode("utf-8", "replace")
    print(json.dumps({"status": resp.status, "elapsed_ms": round(elapsed, 1), "body": body,
                      "headers": {k.lower(): v for k, v in resp.getheaders()}}))


def load(args):
    hostport, path = target(args.url)
    ip, port = hostport.rsplit(":", 1)
    headers = dict(parse_headers(args.header), Host=args.host or hostport)
    conn = None
    kinds, star_colors, statuses, errors, times = {}, {}, {}, 0, []
    for _ in range(args.n):
        started = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(ip, int(port), timeout=30)
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn = None
            continue
        times.append((time.monotonic() - started) * 1000)
        statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
        if resp.status == 200:
            page = json.loads(body)
            kind = page_kind(page)
            kinds[kind] = kinds.get(kind, 0) + 1
            color = stars(page)
            star_colors[color] = star_colors.get(color, 0) + 1
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    times.sort()
    pct = lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 1) if times else None
    print(json.dumps({"requests": args.n, "reviews": kinds, "stars": star_colors, "statuses": statuses,
                      "errors": errors, "p50_ms": pct(0.5), "max_ms": pct(1.0)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for role in ("productpage", "details", "ratings"):
        s = sub.add_parser(role)
        s.add_argument("port", type=int)
        s.add_argument("--name", required=True)
        if role == "productpage":
            s.add_argument("--details", required=True)
            s.add_argument("--reviews", required=True)
            s.add_argument("--reviews-timeout", type=float, default=1.0)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--header", action="append", default=[])
    g.add_argument("--host")
    l = sub.add_parser("load")
    l.add_argument("url")
    l.add_argument("n", type=int)
    l.add_argument("--header", action="append", default=[])
    l.add_argument("--host")
    args = p.parse_args()
    if args.cmd == "get":
        get(args)
    elif args.cmd == "load":
        load(args)
    else:
        serve(args.cmd, args)


if __name__ == "__main__":
    main()
