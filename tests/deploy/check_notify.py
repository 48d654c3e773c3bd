#!/usr/bin/env python3
"""Type=notify for real: unshackle-coordinator, started the way systemd starts it (with
$NOTIFY_SOCKET naming a datagram socket we hold), sends READY=1 once it answers /health on
the port it reports, and STOPPING=1 on SIGTERM before it exits 0. With a worker binary, a
2-rank group under mpirun (as unshackle-worker@.service starts it, NotifyAccess=all) sends
exactly one READY=1, from rank 0, once both ranks have loaded the model.
  check_notify.py COORDINATOR_BIN [WORKER_BIN CLI_BIN]"""
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

# WatchdogSec=30 in the unit gives WATCHDOG_USEC; here 0.2 s, so pings come every 0.1 s.
with tempfile.TemporaryDirectory() as work:
    notify_path = os.path.join(work, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="200000")
    env.pop("UNSHACKLE_API_KEY", None)
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen([binary, "--port", "0", "--worker-port", "0"], env=env, stderr=subprocess.DEVNULL)
    try:
        messages = [listener.recv(4096).decode()]
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            messages.append(listener.recv(4096).decode())
        pings = messages.count("WATCHDOG=1")
        if not messages[0].startswith("READY=1") or pings < 5:
            sys.exit(f"FAIL expected READY=1 then a WATCHDOG=1 every 0.1 s, got {messages[:4]}... ({pings} pings in 1 s)")
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=20) != 0:
            sys.exit("FAIL the coordinator did not exit 0 on SIGTERM with the watchdog on")
    except socket.timeout:
        sys.exit(f"FAIL the watchdog pings stopped: {messages}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
print(f"PASS coordinator watchdog: {pings} WATCHDOG=1 in 1 s with WATCHDOG_USEC=200000")

if len(sys.argv) < 4:
    sys.exit(0)

worker_bin, cli_bin = sys.argv[2], sys.argv[3]
with tempfile.TemporaryDirectory() as work:
    notify_path = os.path.join(work, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(60)
    model = os.path.join(work, "model")
    subprocess.run([cli_bin, "make-model", "--arch", "llama", "--output", model, "--layers", "1", "--hidden", "32",
                    "--heads", "2", "--kv-heads", "1", "--vocab", "259"], check=True, capture_output=True, timeout=60)
    port_file = os.path.join(work, "ports.json")
    plain_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "UNSHACKLE_API_KEY")}
    coordinator = subprocess.Popen([binary, "--port", "0", "--worker-port", "0", "--port-file", port_file],
                                   env=plain_env, stderr=subprocess.DEVNULL)
    group = None
    try:
        for _ in range(200):
            if os.path.exists(port_file):
                break
            time.sleep(0.05)
        ports = json.load(open(port_file))
        env = dict(plain_env, NOTIFY_SOCKET=notify_path, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        group = subprocess.Popen(["mpirun", "--np", "2", "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,tcp",
                                  "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo", worker_bin,
                                  "--model", model, "--coordinator", f"127.0.0.1:{ports['worker']}", "--group", "g0"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            ready = listener.recv(4096).decode()
        except socket.timeout:
            group.kill()
            sys.exit(f"FAIL no READY=1 from the worker group within 60 s: {group.communicate()[0]}")
        if not ready.startswith("READY=1\n") or "2 rank(s) joined" not in ready:
            sys.exit(f"FAIL the group's first message is not READY=1 for 2 ranks: {ready!r}")
        listener.settimeout(2)
        try:
            extra = listener.recv(4096).decode()
            sys.exit(f"FAIL a second notification (only rank 0 may notify): {extra!r}")
        except socket.timeout:
            pass
        group.send_signal(signal.SIGTERM)
        group.wait(timeout=30)
    finally:
        for process in (group, coordinator):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
print(f"PASS worker group: {ready.splitlines()[1]}")
