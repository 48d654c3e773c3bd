#!/usr/bin/env python3
"""The cluster recipes agree with the binaries and with each other: the Kubernetes manifests
parse and use the image the Dockerfile builds, the ports the processes listen on, probes on
/ready and /health, and only flags that `--help` of unshackle-coordinator / unshackle-worker
lists; the systemd units, their example env files and the Slurm script pass flags the same
check accepts.
  check_recipes.py REPO_ROOT VERSION COORDINATOR_BIN [WORKER_BIN]"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

root, version, coordinator_bin = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
worker_bin = sys.argv[4] if len(sys.argv) > 4 else None
failures = []


def fail(message):
    failures.append(message)


def help_flags(binary):
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
    if len(flags) < 3:
        sys.exit(f"{binary} --help listed no flags")
    return flags


flags = {"unshackle-coordinator": help_flags(coordinator_bin)}
if worker_bin:
    flags["unshackle-worker"] = help_flags(worker_bin)
else:
    print("NOTE unshackle-worker is not built here: its flags are not checked")


def check_flags(where, program, args):
    if program not in flags:
        return
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags[program]:
            fail(f"{where}: {program} has no flag {flag} (see {program} --help)")


def option(args, name):
    return args[args.index(name) + 1] if name in args else None


# ---- Dockerfile: the image tag and what it installs ----
dockerfile = (root / "deploy/docker/Dockerfile").read_text()
image = f"unshackle:{version}"
if f"-t {image} " not in dockerfile:
    fail(f"deploy/docker/Dockerfile: the build command should tag {image} (CMake project version)")
for program in ("unshackle-coordinator", "unshackle-worker", "unshackle-group-launch"):
    if f"/usr/local/bin/{program}" not in dockerfile:
        fail(f"deploy/docker/Dockerfile: does not install /usr/local/bin/{program}")

# ---- Kubernetes ----
docs = []
for path in sorted((root / "deploy/kubernetes").glob("*.yaml")):
    try:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            for key in ("apiVersion", "kind", "metadata"):
                if key not in doc:
                    fail(f"{path.name}: a document without {key}")
            docs.append((path.name, doc))
    except yaml.YAMLError as error:
        fail(f"{path.name}: not valid YAML: {error}")
by_kind = {}
for name, doc in docs:
    by_kind.setdefault(doc.get("kind"), []).append((name, doc))
for kind in ("Deployment", "Service", "LeaderWorkerSet", "StatefulSet", "ServiceMonitor"):
    if kind not in by_kind:
        fail(f"deploy/kubernetes: no {kind}")


def pod_spec(doc):
    if doc["kind"] == "LeaderWorkerSet":
        return doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    return doc["spec"]["template"]["spec"]


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


services = {doc["metadata"]["name"]: doc for _, doc in by_kind.get("Service", [])}
coordinator_ports = {}
secret_names = set()
for name, doc in by_kind.get("Deployment", []):
    pod_labels = doc["spec"]["template"]["metadata"]["labels"]
    if not labels_match(doc["spec"]["selector"]["matchLabels"], pod_labels):
        fail(f"{name}: the Deployment's selector does not match its pod labels")
    for container in pod_spec(doc)["containers"]:
        where = f"{name} container {container['name']}"
        if container.get("image") != image:
            fail(f"{where}: image {container.get('image')} is not {image}")
        if container.get("command") != ["unshackle-coordinator"]:
            fail(f"{where}: command should be [unshackle-coordinator]")
            continue
        args = [str(a) for a in container.get("args", [])]
        check_flags(where, "unshackle-coordinator", args)
        named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        http, workers = int(option(args, "--port") or 8000), int(option(args, "--worker-port") or 8001)
        if named.get("http") != http or named.get("workers") != workers:
            fail(f"{where}: container ports {named} do not match --port {http} / --worker-port {workers}")
        if option(args, "--host") != "0.0.0.0" or option(args, "--worker-host") != "0.0.0.0":
            fail(f"{where}: --host and --worker-host must be 0.0.0.0 in a pod (the default 127.0.0.1 is unreachable)")
        readiness = container.get("readinessProbe", {})
        probe_text = yaml.safe_dump(readiness)
        if f"127.0.0.1:{http}/ready" not in probe_text and readiness.get("httpGet", {}).get("path") != "/ready":
            fail(f"{where}: the readiness probe does not ask /ready on port {http}")
        liveness = container.get("livenessProbe", {}).get("httpGet", {})
        if liveness.get("path") != "/health" or liveness.get("port") not in ("http", http):
            fail(f"{where}: the liveness probe should be GET /health on the http port")
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if env["name"] == "UNSHACKLE_API_KEY" and ref:
                secret_names.add((ref["name"], ref["key"]))
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/port") != str(http) or annotations.get("prometheus.io/path") != "/metrics":
            fail(f"{name}: scrape annotations should point at port {http}, /metrics")
        for service_name, service in services.items():
            if labels_match(service["spec"]["selector"], pod_labels):
                for port in service["spec"]["ports"]:
                    if port["targetPort"] not in named:
                        fail(f"Service {service_name}: targetPort {port['targetPort']} is not a container port name")
                    coordinator_ports[(service_name, port["port"])] = (port["targetPort"], service)

for kind in ("LeaderWorkerSet", "StatefulSet"):
    for name, doc in by_kind.get(kind, []):
        spec = pod_spec(doc)
        for container in spec["containers"]:
            where = f"{name} {kind} container {container['name']}"
            if container.get("image") != image:
                fail(f"{where}: image {container.get('image')} is not {image}")
            if container.get("command") != ["unshackle-group-launch"]:
                fail(f"{where}: command should be [unshackle-group-launch]")
            args = [str(a) for a in container.get("args", [])]
            check_flags(where, "unshackle-worker", args)
            if "--group" in args:
                fail(f"{where}: --group is set by unshackle-group-launch (one name per group)")
            for required in ("--model", "--coordinator"):
                if required not in args:
                    fail(f"{where}: {required} is required by unshackle-worker")
            target = option(args, "--coordinator") or ":"
            host, _, port = target.rpartition(":")
            resolved = coordinator_ports.get((host, int(port) if port.isdigit() else -1))
            if not resolved or resolved[0] != "workers":
                fail(f"{where}: --coordinator {target} is not a Service port that reaches the coordinator's worker port")
            elif not resolved[1]["spec"].get("publishNotReadyAddresses"):
                fail(f"Service {host}: groups must reach a not-yet-ready coordinator (publishNotReadyAddresses: true)")
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus is None or str(gpus) != env.get("GPUS_PER_POD"):
                fail(f"{where}: nvidia.com/gpu limit {gpus} != GPUS_PER_POD {env.get('GPUS_PER_POD')} (one rank per GPU)")
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])}
            if not mounts <= volumes:
                fail(f"{where}: volume mounts {sorted(mounts - volumes)} have no volume")
            if kind == "StatefulSet":
                service = services.get(doc["spec"]["serviceName"])
                if not service or service["spec"].get("clusterIP") != "None":
                    fail(f"{name}: serviceName {doc['spec']['serviceName']} is not a headless Service")
                if env.get("HEADLESS_SERVICE") != doc["spec"]["serviceName"]:
                    fail(f"{where}: HEADLESS_SERVICE {env.get('HEADLESS_SERVICE')} != serviceName")
                if env.get("GROUP_SIZE") != str(doc["spec"]["replicas"]):
                    fail(f"{where}: GROUP_SIZE {env.get('GROUP_SIZE')} != replicas {doc['spec']['replicas']}")
        if kind == "LeaderWorkerSet":
            policy = doc["spec"]["leaderWorkerTemplate"].get("restartPolicy")
            if policy != "RecreateGroupOnPodRestart":
                fail(f"{name}: restartPolicy {policy}: a group must restart all together (RecreateGroupOnPodRestart)")

for name, doc in by_kind.get("ServiceMonitor", []):
    endpoint = doc["spec"]["endpoints"][0]
    matched = [s for s in services.values() if labels_match(doc["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
               and any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])]
    if not matched:
        fail(f"{name}: selects no Service with a port named {endpoint['port']}")
    if endpoint.get("path") != "/metrics":
        fail(f"{name}: path should be /metrics")
    credentials = endpoint.get("authorization", {}).get("credentials", {})
    if (credentials.get("name"), credentials.get("key")) not in secret_names:
        fail(f"{name}: the Bearer credentials are not the coordinator's API key Secret {sorted(secret_names)}")

# ---- systemd units and their example environment files ----
systemd = root / "deploy/systemd"
env_values = {}
for env_file in systemd.glob("*.env"):
    for line in env_file.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env_values[key] = value
for unit in sorted(systemd.glob("*.service")):
    text = unit.read_text()
    if "Type=notify" not in text or "Restart=on-failure" not in text:
        fail(f"{unit.name}: should be Type=notify with Restart=on-failure")
    for line in text.splitlines():
        if not line.startswith("ExecStart="):
            continue
        words = shlex.split(line[len("ExecStart="):])
        for i, word in enumerate(words):
            program = Path(word).name
            if program in ("unshackle-coordinator", "unshackle-worker"):
                rest = words[i + 1:]
                expanded = []
                for arg in rest:
                    match = re.fullmatch(r"\$\{?([A-Z_]+)\}?", arg)
                    if match and match.group(1).endswith("_ARGS"):
                        value = env_values.get(match.group(1))
                        if value is None:
                            fail(f"{unit.name}: ${match.group(1)} has no example in deploy/systemd/*.env")
                        expanded += shlex.split(value or "")
                    else:
                        expanded.append(arg)
                check_flags(unit.name, program, expanded)
                for var in re.findall(r"\$\{([A-Z_]+)\}", " ".join(rest)):
                    if var not in env_values:
                        fail(f"{unit.name}: ${{{var}}} has no example in deploy/systemd/*.env")

# ---- Slurm ----
sbatch = (root / "deploy/slurm/unshackle.sbatch").read_text().replace("\\\n", " ")
for line in sbatch.splitlines():
    if "/unshackle-coordinator" in line:
        check_flags("unshackle.sbatch", "unshackle-coordinator", line.split("/unshackle-coordinator", 1)[1].split())
match = re.search(r"worker_args=\(([^)]*)\)", sbatch, re.S)
if not match:
    fail("unshackle.sbatch: no worker_args=(...) found")
else:
    check_flags("unshackle.sbatch worker_args", "unshackle-worker", match.group(1).split())
if "--mpi=pmix" not in sbatch:
    fail("unshackle.sbatch: srun should start the ranks with --mpi=pmix")

for failure in failures:
    print("FAIL", failure)
if failures:
    sys.exit(1)
print(f"PASS {len(docs)} Kubernetes objects, {len(list(systemd.glob('*.service')))} systemd units and the Slurm script "
      f"agree with the binaries' flags, ports and probes")
