#!/usr/bin/env python3
"""Type=notify for real: unshackle-coordinator, started the way systemd starts it (with
$NOTIFY_SOCKET naming a datagram socket we hold), sends READY=1 once it answers /health on
the port it reports, and STOPPING=1 on SIGTERM before it exits 0.
  check_notify.py COORDINATOR_BIN"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

binary = sys.argv[1]
with tempfile.TemporaryDirectory() as work:
    notify_path = os.path.join(work, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(20)
    port_file = os.path.join(work, "ports.json")
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    env.pop("UNSHACKLE_API_KEY", None)
    process = subprocess.Popen([binary, "--port", "0", "--worker-port", "0", "--port-file", port_file], env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        try:
            message = listener.recv(4096).decode()
        except socket.timeout:
            sys.exit("FAIL no sd_notify message within 20 s")
        if not message.startswith("READY=1\n") or "STATUS=" not in message:
            sys.exit(f"FAIL first message is not READY=1 with a STATUS: {message!r}")
        # READY=1 promises a listening service: the port file and /health must already work.
        ports = json.load(open(port_file))
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/health", timeout=5) as reply:
            if reply.status != 200:
                sys.exit(f"FAIL /health answered {reply.status} after READY=1")
        if str(ports["http"]) not in message or str(ports["worker"]) not in message:
            sys.exit(f"FAIL STATUS does not name the ports {ports}: {message!r}")
        process.send_signal(signal.SIGTERM)
        try:
            stopping = listener.recv(4096).decode()
        except socket.timeout:
            sys.exit("FAIL no STOPPING=1 after SIGTERM")
        if stopping != "STOPPING=1":
            sys.exit(f"FAIL expected STOPPING=1 after SIGTERM, got {stopping!r}")
        code = process.wait(timeout=20)
        if code != 0:
            sys.exit(f"FAIL exit code {code} after SIGTERM: {process.stderr.read()}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
print(f"PASS coordinator: {message.splitlines()[1]}; STOPPING=1 and exit 0 on SIGTERM")
