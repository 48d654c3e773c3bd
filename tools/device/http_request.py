#!/usr/bin/env python3
"""The device scripts' HTTP client (the GPU machine may have no curl): one request, the
Bearer key from $UNSHACKLE_API_KEY, --timeout on each wait for the server (the scripts bound
the whole exchange with timeout(1)).
  http_request.py [--method M] [--data FILE] [--out FILE] [--timeout S] URL
The body goes to --out (then the HTTP status is printed on stdout) or to stdout.
Exit: 0 for 2xx, 22 for another status (as curl -f), 28 on timeout, 7 when nothing answers."""
import argparse
import os
import socket
import sys
import urllib.error
import urllib.request

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("url")
parser.add_argument("--method", default=None)
parser.add_argument("--data", help="file sent as the JSON body")
parser.add_argument("--out", help="file for the body; the status is printed instead")
parser.add_argument("--timeout", type=float, default=30)
args = parser.parse_args()

headers = {}
if os.environ.get("UNSHACKLE_API_KEY"):
    headers["Authorization"] = "Bearer " + os.environ["UNSHACKLE_API_KEY"]
data = None
if args.data:
    with open(args.data, "rb") as f:
        data = f.read()
    headers["Content-Type"] = "application/json"
request = urllib.request.Request(args.url, data=data, headers=headers, method=args.method)


def finish(status, body):
    if args.out:
        with open(args.out, "wb") as f:
            f.write(body)
        print(status)
    else:
        sys.stdout.buffer.write(body)
    sys.exit(0 if 200 <= status < 300 else 22)


try:
    with urllib.request.urlopen(request, timeout=args.timeout) as reply:
        finish(reply.status, reply.read())
except urllib.error.HTTPError as e:
    finish(e.code, e.read())
except (socket.timeout, TimeoutError):
    print(f"http_request.py: {args.url}: no answer within {args.timeout} s", file=sys.stderr)
    if args.out:
        print("000")
    sys.exit(28)
except (urllib.error.URLError, ConnectionError, OSError) as e:
    print(f"http_request.py: {args.url}: {e}", file=sys.stderr)
    if args.out:
        print("000")
    sys.exit(7)
