#!/usr/bin/env python3
"""Benchmark gatehouse, nginx and h2o with equivalent configurations, in one run.

Started by bench/run, which installs the tools and builds gatehouse. Each scenario starts each
server fresh, pinned to CPU 0, drives it from CPU 1, and records requests per second, the
server's CPU time per request (user + system of its whole process tree, from /proc), p50/p99
latency and peak RSS. The method is described in docs/performance.md.

Environment:
  BENCH_DURATION   seconds of load per measurement (integer, default 5)
  BENCH_WARMUP     seconds of the same load before each measurement (integer, default 1; 0 = none)
  BENCH_SCENARIOS  comma-separated scenario names (default: all; see SCENARIOS below)
  BENCH_SERVERS    comma-separated servers (default: gatehouse,nginx,h2o,hyper; hyper, the
                   floor, is hyper alone from bench/hyper-baseline and runs only the fixed-answer
                   scenarios)
  BENCH_IDLE_CONNS connections held by the idle-memory scenarios (default 5000)
  BENCH_RATE       requests/s for fixed-rate (default: half of nginx's h1 rate in this run)
"""

import argparse
import datetime
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SERVER_CPU = "0"
CLIENT_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = ["gatehouse", "nginx", "h2o", "hyper"]
# The servers a scenario runs on unless it names its own: hyper alone has no files, TLS or proxy.
FULL_SERVERS = ["gatehouse", "nginx", "h2o"]
SMALL_BODY = b"hello, world\n"
LARGE_SIZE = 1 << 20

# Fixed ports below the ephemeral range (32768+), so an outgoing connection elsewhere on the
# machine cannot hold one of them. nginx 1.22 cannot serve HTTP/1.1 and h2c on one port, so it
# has a separate h2c port; gatehouse and h2o tell them apart by the connection preface.
PORTS = {
    "gatehouse": {"h1": 18080, "h2c": 18080, "tls": 18443},
    "nginx": {"h1": 18180, "h2c": 18181, "tls": 18543},
    "h2o": {"h1": 18280, "h2c": 18280, "tls": 18643},
    "hyper": {"h1": 18480, "h2c": 18481},
}
UPSTREAM_PORT = 18380

# Clients offer one TLS 1.3 cipher suite and one key-exchange group, so every server does the
# same cryptography whatever its own preference order is.
TLS13_SUITE = "TLS_AES_128_GCM_SHA256"
TLS_GROUP = "X25519"

# Connection rotation (gatehouse max_requests_per_connection, nginx keepalive_requests), raised
# from their default of 1000 for every server: see gatehouse_conf.
REQUESTS_PER_CONNECTION = 1000000


class ScenarioFailed(Exception):
    """A measurement that could not be taken; its message goes into the table."""


# ---------------------------------------------------------------------------------------------
# Processes


def proc_tree(root):
    """The pid of `root` and of all its descendants that are alive now."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(pid):
    """utime + stime of a process (all its threads) and of its reaped children, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # After the ")": state is field 3 of stat(5), so utime (14) is index 11 here.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime + stime + cutime + cstime


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Server:
    """One server process tree, pinned to SERVER_CPU, with its output in a log file."""

    def __init__(self, name, argv, ports, log_path, cpu=SERVER_CPU):
        self.name = name
        self.argv = ["taskset", "-c", cpu] + argv
        self.ports = sorted(set(ports))
        self.log_path = log_path
        self.proc = None

    def start(self):
        for port in self.ports:
            if port_open(port):
                raise ScenarioFailed(f"port {port} is already in use by another process")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ScenarioFailed(
                    f"{self.name} exited with {self.proc.returncode} at start: {self.log_tail()}"
                )
            if all(port_open(p) for p in self.ports):
                return
            time.sleep(0.05)
        self.stop()
        raise ScenarioFailed(f"{self.name} did not listen on {self.ports} within 20 s: {self.log_tail()}")

    def log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [l.strip() for l in f if l.strip()]
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])[-400:] or "(empty log)"

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        # The server is its own process group leader (start_new_session), so this reaches the
        # nginx worker and h2o's helper processes too, and nothing else.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def cpu_ticks(self):
        return sum(cpu_ticks(p) for p in proc_tree(self.proc.pid))

    def rss_kib(self):
        return sum(status_kib(p, "VmRSS") for p in proc_tree(self.proc.pid))

    def hwm_kib(self):
        return sum(status_kib(p, "VmHWM") for p in proc_tree(self.proc.pid))


# ---------------------------------------------------------------------------------------------
# Configurations


class Env:
    """Files shared by all servers: certificate, document root, configurations, logs."""

    def __init__(self, gatehouse, repo, hyper=None):
        self.gatehouse = gatehouse
        self.hyper = hyper
        self.repo = repo
        self.dir = tempfile.mkdtemp(prefix="gatehouse-bench-")
        # nginx's worker and h2o may drop privileges; let them traverse to the files.
        os.chmod(self.dir, 0o755)
        self.www = os.path.join(self.dir, "www")
        os.mkdir(self.www)
        with open(os.path.join(self.www, "small.txt"), "wb") as f:
            f.write(SMALL_BODY)
        with open(os.path.join(self.www, "1m.bin"), "wb") as f:
            f.write(os.urandom(LARGE_SIZE))
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        run_checked([
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "30", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        os.chmod(self.key, 0o600)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def server(self, name, variant="base"):
        """A Server for `name` in `variant`: "base", "log" (access log on) or "proxy"."""
        run_dir = tempfile.mkdtemp(prefix=f"{name}-{variant}-", dir=self.dir)
        os.chmod(run_dir, 0o755)
        log = os.path.join(run_dir, "server.log")
        if name == "gatehouse":
            conf = os.path.join(run_dir, "gatehouse.toml")
            write(conf, gatehouse_conf(self, run_dir, variant))
            argv = [self.gatehouse, "serve", "-c", conf]
        elif name == "nginx":
            conf = os.path.join(run_dir, "nginx.conf")
            write(conf, nginx_conf(self, run_dir, variant))
            argv = [nginx_binary(), "-c", conf, "-p", run_dir, "-e", os.path.join(run_dir, "error.log")]
        elif name == "h2o":
            conf = os.path.join(run_dir, "h2o.yaml")
            write(conf, h2o_conf(self, run_dir, variant))
            argv = ["h2o", "-c", conf]
        elif name == "hyper":
            if not self.hyper:
                raise ScenarioFailed("bench/hyper-baseline was not built (bench/run builds it)")
            # Every path answers the fixed body; one listener per protocol.
            ports = PORTS["hyper"]
            argv = [self.hyper, str(ports["h1"]), "h1", str(ports["h2c"]), "h2c"]
        else:
            raise ValueError(name)
        return Server(name, argv, PORTS[name].values(), log)

    def upstream(self):
        """The proxy scenario's upstream: an nginx on the load generator's CPU, so that it
        takes no CPU time from the server measured."""
        run_dir = tempfile.mkdtemp(prefix="upstream-", dir=self.dir)
        os.chmod(run_dir, 0o755)
        conf = os.path.join(run_dir, "nginx.conf")
        write(conf, nginx_conf(self, run_dir, "upstream"))
        argv = [nginx_binary(), "-c", conf, "-p", run_dir, "-e", os.path.join(run_dir, "error.log")]
        return Server("upstream nginx", argv, [UPSTREAM_PORT], os.path.join(run_dir, "server.log"),
                      cpu=CLIENT_CPU)


def nginx_binary():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def gatehouse_conf(env, run_dir, variant):
    ports = PORTS["gatehouse"]
    # The proxy variant forwards /proxy/ to the upstream nginx with the upstream's defaults
    # (pooled keep-alive HTTP/1.1 connections, health and breaker bookkeeping on). gatehouse sends
    # the path unchanged, so the upstream serves /proxy/ from the same directory (see nginx_conf).
    proxy = ""
    if variant == "proxy":
        proxy = f"""\
[[upstreams]]
name = "bench"
servers = ["127.0.0.1:{UPSTREAM_PORT}"]

[[routes]]
path = "/proxy"
proxy = "bench"
"""
    access_log = os.path.join(run_dir, "access.log") if variant == "log" else "off"
    # Everything not written here keeps its default: the timeouts, limits and metrics stay on as a
    # user would run them. Two limits are raised, and still checked on every connection/request:
    # the per-address connection limit, because all load comes from 127.0.0.1 (the idle scenario
    # alone holds 5,000 connections), and the requests per connection, because h2load does not
    # reconnect after a GOAWAY, so a rotated HTTP/2 connection would silently leave the test
    # (nginx gets the same keepalive_requests; h2o has no such limit). The admin API is off so
    # that its port cannot collide with anything.
    return f"""\
[server]
workers = 1
state_dir = "{run_dir}/state"

[[listeners]]
name = "http"
address = "127.0.0.1:{ports['h1']}"
protocols = ["http/1.1", "h2c"]

[[listeners]]
name = "https"
address = "127.0.0.1:{ports['tls']}"
protocols = ["h2", "http/1.1"]
[listeners.tls]
cert = "{env.cert}"
key = "{env.key}"

[limits]
max_connections = 20000
max_connections_per_ip = 20000
max_requests_per_connection = {REQUESTS_PER_CONNECTION}

[[routes]]
path = "/fixed"
respond = {{ status = 200, body = "hello, world\\n", content_type = "text/plain" }}

{proxy}
[[routes]]
path = "/"
static = "{env.www}"

[admin]
address = ""

[log]
access_log = "{access_log}"
"""


def nginx_conf(env, run_dir, variant):
    ports = PORTS["nginx"]
    temp = "\n".join(
        f"    {kind}_temp_path {run_dir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    if variant == "upstream":
        servers = f"""\
    server {{
        listen 127.0.0.1:{UPSTREAM_PORT};
        root {env.www};
        # gatehouse forwards the path unchanged; nginx and h2o strip the /proxy/ prefix.
        location /proxy/ {{
            alias {env.www}/;
        }}
    }}"""
    else:
        proxy = ""
        if variant == "proxy":
            proxy = f"""\
        location /proxy/ {{
            proxy_pass http://bench_upstream/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
        servers = f"""\
    upstream bench_upstream {{
        server 127.0.0.1:{UPSTREAM_PORT};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{ports['h1']};
        listen 127.0.0.1:{ports['h2c']} http2;
        listen 127.0.0.1:{ports['tls']} ssl http2;
        root {env.www};
        location = /fixed {{
            default_type text/plain;
            return 200 "hello, world\\n";
        }}
{proxy}
    }}"""
    access_log = f"{run_dir}/access.log" if variant == "log" else "off"
    # One worker (plus the idle master), Debian's defaults for sendfile/tcp_nopush, the 75 s
    # keep-alive timeout gatehouse uses, and the same requests-per-connection limit.
    return f"""\
user root;
worker_processes 1;
daemon off;
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log error;
worker_rlimit_nofile 20000;
events {{
    worker_connections 10240;
}}
http {{
{temp}
    access_log {access_log};
    default_type application/octet-stream;
    types {{ text/plain txt; }}
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests {REQUESTS_PER_CONNECTION};
    ssl_certificate {env.cert};
    ssl_certificate_key {env.key};
    ssl_protocols TLSv1.2 TLSv1.3;
{servers}
}}
"""


def h2o_conf(env, run_dir, variant):
    ports = PORTS["h2o"]
    access_log = f"access-log: {run_dir}/access.log\n" if variant == "log" else ""
    proxy = ""
    if variant == "proxy":
        proxy = f"""\
      /proxy:
        proxy.reverse.url: http://127.0.0.1:{UPSTREAM_PORT}/
"""
    # One thread; keep-alive timeouts raised from h2o's 10 s to the 75 s of the others, so that
    # idle connections survive the idle-memory measurement; no OCSP fetcher process.
    return f"""\
user: root
num-threads: 1
max-connections: 20000
http1-request-timeout: 75
http2-idle-timeout: 75
pid-file: {run_dir}/h2o.pid
error-log: {run_dir}/error.log
{access_log}listen:
  host: 127.0.0.1
  port: {ports['h1']}
listen:
  host: 127.0.0.1
  port: {ports['tls']}
  ssl:
    certificate-file: {env.cert}
    key-file: {env.key}
    ocsp-update-interval: 0
hosts:
  default:
    paths:
{proxy}      /:
        file.dir: {env.www}
"""


# ---------------------------------------------------------------------------------------------
# Load generators and their output


def run_checked(argv, timeout=60):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ScenarioFailed(f"{argv[0]} exited {result.returncode}: {tail(result.stderr or result.stdout)}")
    return result.stdout


def tail(text, n=200):
    text = " ".join(text.split())
    return text[-n:]


def client(argv, timeout):
    """Run a load generator pinned to the client CPU; its stdout+stderr."""
    try:
        result = subprocess.run(["taskset", "-c", CLIENT_CPU] + argv, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ScenarioFailed(f"{argv[0]} did not finish within {timeout} s")
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise ScenarioFailed(f"{argv[0]} exited {result.returncode}: {tail(out)}")
    return out


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out):
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    if not m:
        raise ScenarioFailed(f"wrk printed no request count: {tail(out)}")
    requests = int(m.group(1))
    errors = 0
    m2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m2:
        errors += int(m2.group(1))
    m3 = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m3:
        errors += sum(int(x) for x in m3.groups())
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
        lat[pct] = float(value) * UNITS[unit]
    return {"requests": requests - (int(m2.group(1)) if m2 else 0), "errors": errors,
            "p50": lat.get("50"), "p99": lat.get("99")}


def parse_h2load(out, log_file):
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if not m:
        raise ScenarioFailed(f"h2load printed no request counts: {tail(out)}")
    succeeded, failed, errored, timeouts = (int(x) for x in m.groups())
    p50 = p99 = None
    durations = []
    try:
        with open(log_file) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) == 3 and parts[1].startswith("2"):
                    durations.append(int(parts[2]))
    except OSError:
        pass
    if durations:
        durations.sort()
        p50 = durations[(len(durations) - 1) // 2] / 1000
        p99 = durations[int(0.99 * (len(durations) - 1))] / 1000
    return {"requests": succeeded, "errors": failed + errored + timeouts, "p50": p50, "p99": p99}


def wrk(url, connections):
    def command(seconds, log_file=None):  # wrk has no per-request log
        return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    return command, lambda out, _log: parse_wrk(out)


def h2load(url, clients, streams, extra=()):
    def command(seconds, log_file=None):
        argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", str(seconds)]
        if url.startswith("https:"):
            argv += ["--groups", TLS_GROUP, "--tls13-ciphers", TLS13_SUITE]
        if log_file:
            argv += ["--log-file", log_file]
        return argv + list(extra) + [url]
    return command, parse_h2load


# ---------------------------------------------------------------------------------------------
# Measurements


class Bench:
    def __init__(self, env, duration, warmup, servers, idle_conns, rate):
        self.env = env
        self.duration = duration
        self.warmup = warmup
        self.servers = servers
        self.idle_conns = idle_conns
        self.rate = rate
        self.results = {}  # (scenario, server) -> dict, or {"failed": reason}

    def with_server(self, name, variant, body):
        server = self.env.server(name, variant)
        server.start()
        try:
            return body(server)
        finally:
            server.stop()

    def load(self, server, tool):
        """Warm up, then one load window; the server's CPU time over that window per request."""
        command, parse = tool
        log_file = self.env.path(f"requests-{server.name}.log")
        if self.warmup:
            client(command(self.warmup), timeout=self.warmup + 60)
        argv = command(self.duration, log_file)
        before = server.cpu_ticks()
        started = time.monotonic()
        out = client(argv, timeout=self.duration + 120)
        elapsed = time.monotonic() - started
        after = server.cpu_ticks()
        result = parse(out, log_file)
        if os.path.exists(log_file):
            os.unlink(log_file)
        return self.finish(server, result, after - before, elapsed)

    def finish(self, server, result, ticks, elapsed):
        requests = result["requests"]
        if requests <= 0:
            raise ScenarioFailed(f"no successful requests ({result.get('errors', 0)} errors)")
        result["rps"] = requests / elapsed
        result["cpu_us"] = ticks / CLK_TCK * 1e6 / requests
        result["cpu_util"] = ticks / CLK_TCK / elapsed
        result["hwm_kib"] = server.hwm_kib()
        return result

    def handshakes(self, server, reuse):
        """`openssl s_time`: one connection at a time, each a TLS 1.3 handshake (full, or resumed
        with the session of the first connection) and one HTTP/1.0 GET of the small file."""
        port = PORTS[server.name]["tls"]
        argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-www", "/small.txt",
                "-tls1_3", "-ciphersuites", TLS13_SUITE, "-time", str(self.duration),
                "-reuse" if reuse else "-new"]
        before = server.cpu_ticks()
        started = time.monotonic()
        out = client(argv, timeout=self.duration + 60)
        elapsed = time.monotonic() - started
        after = server.cpu_ticks()
        m = re.findall(r"(\d+) connections in [\d.]+s;", out)
        if not m:
            raise ScenarioFailed(f"s_time printed no connection count: {tail(out)}")
        progress = "".join(re.findall(r"^[*r0-9]+$", out, re.M))
        connections = int(m[-1])
        resumed = progress.count("r")
        result = {"requests": connections, "errors": 0, "p50": None, "p99": None}
        if reuse:
            if resumed < connections * 0.9:
                raise ScenarioFailed(f"only {resumed} of {connections} connections were resumed")
            result["note"] = f"{resumed} of {connections} resumed"
        elif resumed:
            result["note"] = f"{resumed} of {connections} unexpectedly resumed"
        result = self.finish(server, result, after - before, elapsed)
        result["note"] = (result.get("note", "") + f"; {1e6 / result['cpu_us']:.0f} handshakes per CPU second").lstrip("; ")
        return result

    def idle_memory(self, server, tls):
        """Open self.idle_conns keep-alive connections (one request each), RSS growth per conn."""
        port = PORTS[server.name]["tls" if tls else "h1"]
        # One request first, so that lazily initialised state (TLS config, file handles, buffer
        # pools) is in the baseline and not charged to the connections.
        argv = [sys.executable, os.path.join(os.path.dirname(__file__), "idle_conns.py"),
                "--port", str(port), "--connections", "1"]
        if tls:
            argv += ["--tls", "--cafile", self.env.cert]
        warm = subprocess.run(["taskset", "-c", CLIENT_CPU] + argv, input="", capture_output=True,
                              text=True, timeout=60)
        if not warm.stdout.startswith("ready 1 0"):
            raise ScenarioFailed(f"warm-up connection failed: {tail(warm.stdout + warm.stderr)}")
        time.sleep(0.5)
        before = server.rss_kib()
        argv[argv.index("--connections") + 1] = str(self.idle_conns)
        holder = subprocess.Popen(["taskset", "-c", CLIENT_CPU] + argv, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = holder.stdout.readline().split(" ", 3)
            if len(line) < 3 or line[0] != "ready":
                raise ScenarioFailed(f"idle client: {tail(holder.stderr.read())}")
            ok, failed = int(line[1]), int(line[2])
            if failed:
                raise ScenarioFailed(f"{failed} of {self.idle_conns} connections failed: {line[3].strip()}")
            # Let the server finish whatever the last connections started.
            time.sleep(1)
            after = server.rss_kib()
            hwm = server.hwm_kib()
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)
        return {"connections": ok, "before_kib": before, "after_kib": after, "hwm_kib": hwm,
                "per_conn_bytes": (after - before) * 1024 / ok}


# ---------------------------------------------------------------------------------------------
# Scenarios


def scenario_list():
    """(name, title, kind, servers or None for all, function(bench, server_name) -> result)."""
    def on(variant, make_tool, path_key="h1"):
        def run(bench, name):
            tool = make_tool(name)
            return bench.with_server(name, variant, lambda s: bench.load(s, tool))
        return run

    def url(name, key, path):
        scheme = "https" if key == "tls" else "http"
        return f"{scheme}://127.0.0.1:{PORTS[name][key]}{path}"

    def proxy(bench, name):
        upstream = bench.env.upstream()
        upstream.start()
        try:
            return bench.with_server(name, "proxy", lambda s: bench.load(
                s, wrk(url(name, "h1", "/proxy/small.txt"), 64)))
        finally:
            upstream.stop()

    def fixed_rate(bench, name):
        rate = bench.rate
        if rate is None:
            nginx = bench.results.get(("h1", "nginx"), {})
            if "rps" not in nginx:
                raise ScenarioFailed("needs nginx's h1 rate from this run (or BENCH_RATE)")
            rate = nginx["rps"] / 2
        clients = 16
        per_client = max(1, round(rate / clients))
        tool = h2load(url(name, "h1", "/small.txt"), clients, 1, ["--h1", f"--rps={per_client}"])
        result = bench.with_server(name, "base", lambda s: bench.load(s, tool))
        target = per_client * clients
        result["note"] = f"target {target} req/s"
        if result["rps"] < 0.9 * target:
            result["note"] += " not reached (server or load generator saturated): not a fixed-rate figure"
        return result

    def idle(tls):
        def run(bench, name):
            return bench.with_server(name, "base", lambda s: bench.idle_memory(s, tls))
        return run

    def handshake(reuse):
        def run(bench, name):
            return bench.with_server(name, "base", lambda s: bench.handshakes(s, reuse))
        return run

    return [
        ("h1", "HTTP/1.1 keep-alive, 13-byte static file, 64 connections (wrk)", "load", None,
         on("base", lambda n: wrk(url(n, "h1", "/small.txt"), 64))),
        ("h1-fixed", "HTTP/1.1 keep-alive, 13-byte fixed answer from memory (gatehouse `respond`, nginx `return`, hyper alone), 64 connections (wrk)",
         "load", ["gatehouse", "nginx", "hyper"], on("base", lambda n: wrk(url(n, "h1", "/fixed"), 64))),
        ("h1-log", "as h1, access log on (written to a file)", "load", None,
         on("log", lambda n: wrk(url(n, "h1", "/small.txt"), 64))),
        ("h2tls", "HTTP/2 over TLS 1.3, 13-byte static file, 32 connections x 10 streams (h2load)", "load", None,
         on("base", lambda n: h2load(url(n, "tls", "/small.txt"), 32, 10))),
        ("h2tls-fixed", "as h2tls, with the in-memory fixed answer (gatehouse `respond`, nginx `return`)", "load",
         ["gatehouse", "nginx"], on("base", lambda n: h2load(url(n, "tls", "/fixed"), 32, 10))),
        ("h2c", "HTTP/2 cleartext (prior knowledge), 13-byte static file, 32 connections x 10 streams (h2load)",
         "load", None, on("base", lambda n: h2load(url(n, "h2c", "/small.txt"), 32, 10))),
        ("h2c-fixed", "as h2c, with the in-memory fixed answer (gatehouse `respond`, nginx `return`, hyper alone)",
         "load", ["gatehouse", "nginx", "hyper"], on("base", lambda n: h2load(url(n, "h2c", "/fixed"), 32, 10))),
        ("tls-full", "new TLS 1.3 connection per request, full handshake, ECDSA P-256 (openssl s_time -new)",
         "load", None, handshake(False)),
        ("tls-resumed", "new TLS 1.3 connection per request, resumed (openssl s_time -reuse)", "load", None,
         handshake(True)),
        ("h1-1m", "1 MiB static file, HTTP/1.1 cleartext, 16 connections (wrk)", "load", None,
         on("base", lambda n: wrk(url(n, "h1", "/1m.bin"), 16))),
        ("h2-1m", "1 MiB static file, HTTP/2 over TLS, 4 connections x 4 streams (h2load)", "load", None,
         on("base", lambda n: h2load(url(n, "tls", "/1m.bin"), 4, 4))),
        ("proxy", "reverse proxy to a local nginx upstream on CPU 1, HTTP/1.1, 64 connections (wrk)", "load",
         None, proxy),
        ("fixed-rate", "HTTP/1.1 at a fixed rate of half nginx's h1 rate, 16 connections (h2load --rps)",
         "load", None, fixed_rate),
        ("idle", "idle HTTP/1.1 keep-alive connections, cleartext", "memory", None, idle(False)),
        ("idle-tls", "idle HTTP/1.1 keep-alive connections, TLS 1.3", "memory", None, idle(True)),
    ]


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}"


def machine_description():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model, os.cpu_count()


def version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        # wrk's first line goes on with a copyright notice.
        return text[0].split(" [")[0].split(" Copyright")[0] if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def locked_version(repo, crate):
    """The version of `crate` in gatehouse's Cargo.lock (which bench/hyper-baseline builds with)."""
    try:
        with open(os.path.join(repo, "Cargo.lock")) as f:
            m = re.search(r'\[\[package\]\]\nname = "' + re.escape(crate) + r'"\nversion = "([^"]+)"', f.read())
    except OSError:
        return "?"
    return m.group(1) if m else "?"


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def report(bench, scenarios, header):
    out = [header, ""]
    out.append("## Throughput, CPU and latency")
    out.append("")
    out.append("CPU µs/req: user + system time of the server's processes during the load window, "
               "divided by the requests completed (for tls-*: per connection, handshake + one request). "
               "util: server CPU time / wall time (1.00 = CPU 0 saturated).")
    out.append("")
    out.append("| scenario | server | req/s | CPU µs/req | util | p50 ms | p99 ms | peak RSS MiB | notes |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, title, kind, only, _ in scenarios:
        if kind != "load":
            continue
        for server in bench.servers:
            if server not in (only or FULL_SERVERS):
                continue
            r = bench.results.get((name, server))
            if r is None:
                continue
            if "failed" in r:
                out.append(f"| {name} | {server} | | | | | | | failed: {r['failed']} |")
                continue
            notes = []
            if r.get("errors"):
                notes.append(f"{r['errors']} errors")
            if r.get("note"):
                notes.append(r["note"])
            if name in ("h1-1m", "h2-1m"):
                notes.append(f"{r['rps'] * LARGE_SIZE / (1 << 20):.0f} MiB/s")
            out.append(
                f"| {name} | {server} | {r['rps']:.0f} | {r['cpu_us']:.1f} | {r['cpu_util']:.2f} | "
                f"{fmt(r.get('p50'), '.2f')} | {fmt(r.get('p99'), '.2f')} | {r['hwm_kib'] / 1024:.1f} | "
                f"{'; '.join(notes)} |")
    out.append("")

    out.append("## Ratios (gatehouse ÷ other, same run; CPU below 1.00 means gatehouse spends less)")
    out.append("")
    out.append("hyper is hyper alone (bench/hyper-baseline): the floor under gatehouse, not a server to pick.")
    out.append("")
    out.append("| scenario | CPU/req vs nginx | CPU/req vs h2o | CPU/req vs hyper | req/s vs nginx | req/s vs h2o |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for name, title, kind, only, _ in scenarios:
        if kind != "load":
            continue
        g = bench.results.get((name, "gatehouse"), {})
        if not g:
            continue
        if "failed" in g:
            out.append(f"| {name} | failed: {g['failed']} | | | | |")
            continue
        n = bench.results.get((name, "nginx"), {})
        h = bench.results.get((name, "h2o"), {})
        y = bench.results.get((name, "hyper"), {})
        out.append(f"| {name} | {ratio(g.get('cpu_us'), n.get('cpu_us'))} | {ratio(g.get('cpu_us'), h.get('cpu_us'))} | "
                   f"{ratio(g.get('cpu_us'), y.get('cpu_us'))} | "
                   f"{ratio(g.get('rps'), n.get('rps'))} | {ratio(g.get('rps'), h.get('rps'))} |")
    out.append("")

    derived = []
    cpu = {key: r["cpu_us"] for key, r in bench.results.items() if "cpu_us" in r}
    for server in bench.servers:
        base, logged = cpu.get(("h1", server)), cpu.get(("h1-log", server))
        if base is not None and logged is not None:
            derived.append(f"- access log cost, {server}: {logged - base:+.1f} µs per request "
                           f"({base:.1f} → {logged:.1f})")
    for server in bench.servers:
        base, proxied = cpu.get(("h1", server)), cpu.get(("proxy", server))
        if base is not None and proxied is not None:
            derived.append(f"- extra CPU per proxied request, {server}: {proxied - base:+.1f} µs "
                           f"(proxy {proxied:.1f} vs direct h1 {base:.1f})")
    # The same over each server's in-memory answer: a proxied request opens no file, where the
    # static-file request above does (nginx: open, fstat, sendfile and close per request), so
    # this is what proxying adds to the cheapest direct answer.
    for server in bench.servers:
        base, proxied = cpu.get(("h1-fixed", server)), cpu.get(("proxy", server))
        if base is not None and proxied is not None:
            derived.append(f"- extra CPU per proxied request over the fixed answer, {server}: "
                           f"{proxied - base:+.1f} µs (proxy {proxied:.1f} vs h1-fixed {base:.1f})")
    for scenario in ("h1-1m", "h2-1m"):
        for server in bench.servers:
            large = cpu.get((scenario, server))
            if large is not None:
                derived.append(f"- CPU per byte, {scenario}, {server}: {large / LARGE_SIZE * 1000:.2f} ns/byte")
    if derived:
        out.append("## Derived figures")
        out.append("")
        out.extend(derived)
        out.append("")

    mem = [(n, t) for n, t, k, _, _ in scenarios if k == "memory"]
    if any((n, s) in bench.results for n, _ in mem for s in bench.servers):
        out.append("## Memory per idle keep-alive connection")
        out.append("")
        out.append("RSS of the server's processes before and after opening the connections (each sent one "
                   "request and got its answer), fresh server process for each row.")
        out.append("")
        out.append("| scenario | server | connections | RSS before MiB | RSS after MiB | bytes per connection | gatehouse ÷ this |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for name, _ in mem:
            g = bench.results.get((name, "gatehouse"), {})
            for server in bench.servers:
                r = bench.results.get((name, server))
                if r is None:
                    continue
                if "failed" in r:
                    out.append(f"| {name} | {server} | | | | failed: {r['failed']} | |")
                    continue
                rel = ratio(g.get("per_conn_bytes"), r["per_conn_bytes"]) if server != "gatehouse" else ""
                out.append(f"| {name} | {server} | {r['connections']} | {r['before_kib'] / 1024:.1f} | "
                           f"{r['after_kib'] / 1024:.1f} | {r['per_conn_bytes']:.0f} | {rel} |")
        out.append("")

    out.append("## Scenarios")
    out.append("")
    for name, title, _, _, _ in scenarios:
        out.append(f"- `{name}`: {title}")
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def env_int(name, default, minimum):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"bench: {name}={raw!r} is not a whole number")
    if value < minimum:
        sys.exit(f"bench: {name} must be at least {minimum}")
    return value


def main():
    parser = argparse.ArgumentParser(description="gatehouse benchmark harness (run bench/run)")
    parser.add_argument("--gatehouse", required=True, help="path of the gatehouse binary")
    parser.add_argument("--repo", required=True, help="repository root (results go to bench/results)")
    parser.add_argument("--build", default="release", help="how the gatehouse binary was built, for the header")
    parser.add_argument("--results", help="directory for the results file (default: <repo>/bench/results)")
    parser.add_argument("--hyper", help="path of bench/hyper-baseline's binary (the `hyper` server)")
    args = parser.parse_args()

    duration = env_int("BENCH_DURATION", 5, 1)
    warmup = env_int("BENCH_WARMUP", 1, 0)
    idle_conns = env_int("BENCH_IDLE_CONNS", 5000, 1)
    rate = env_int("BENCH_RATE", 0, 0) or None
    scenarios = scenario_list()
    names = [s[0] for s in scenarios]
    wanted = [s.strip() for s in os.environ.get("BENCH_SCENARIOS", "").split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        sys.exit(f"bench: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}")
    if wanted:
        scenarios = [s for s in scenarios if s[0] in wanted]
    servers = [s.strip() for s in os.environ.get("BENCH_SERVERS", ",".join(SERVERS)).split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVERS]
    if bad:
        sys.exit(f"bench: unknown server(s) {', '.join(bad)}; known: {', '.join(SERVERS)}")

    # Servers inherit this limit; the idle scenario needs thousands of descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < idle_conns + 256:
        print(f"bench: warning: open-file limit {hard} is below {idle_conns} idle connections", file=sys.stderr)

    model, cpus = machine_description()
    started = datetime.datetime.now()
    load_before = loadavg()
    commit = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()

    env = Env(args.gatehouse, args.repo, args.hyper)
    bench = Bench(env, duration, warmup, servers, idle_conns, rate)
    try:
        for name, title, kind, only, run in scenarios:
            for server in servers:
                if server not in (only or FULL_SERVERS):
                    continue
                print(f"bench: {name} / {server} ...", file=sys.stderr, flush=True)
                try:
                    result = run(bench, server)
                    bench.results[(name, server)] = result
                    if "cpu_us" in result:
                        summary = f"{result['rps']:.0f} req/s, {result['cpu_us']:.1f} µs CPU/req"
                    else:
                        summary = f"{result['per_conn_bytes']:.0f} bytes per connection"
                    print(f"bench: {name} / {server}: {summary}", file=sys.stderr, flush=True)
                except ScenarioFailed as e:
                    bench.results[(name, server)] = {"failed": str(e)}
                    print(f"bench: {name} / {server}: failed: {e}", file=sys.stderr, flush=True)
                except Exception as e:  # one broken measurement must not lose the others
                    reason = f"{type(e).__name__}: {e}"
                    bench.results[(name, server)] = {"failed": reason}
                    print(f"bench: {name} / {server}: failed: {reason}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(env.dir, ignore_errors=True)

    header = "\n".join([
        f"# gatehouse benchmark, {started:%Y-%m-%d %H:%M}",
        "",
        f"- machine: {cpus} CPUs, {model}; server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}",
        f"- load average at start {load_before}, at end {loadavg()} (other work on the machine skews absolute figures; compare ratios)",
        f"- gatehouse {commit}{' (uncommitted changes)' if dirty else ''} ({args.build} build), {version(['nginx', '-v'])}, "
        f"{version(['h2o', '--version'])}, {version(['wrk', '-v'])}, {version(['h2load', '--version'])}, "
        f"{version(['openssl', 'version'])}, hyper alone: bench/hyper-baseline with hyper {locked_version(args.repo, 'hyper')} "
        f"and h2 {locked_version(args.repo, 'h2')}",
        f"- {duration} s per measurement after {warmup} s of warm-up; TLS clients offer only "
        f"{TLS13_SUITE} and {TLS_GROUP}",
    ])
    text = report(bench, scenarios, header)
    print(text)
    results_dir = args.results or os.path.join(args.repo, "bench", "results")
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{started:%Y%m%d-%H%M%S}.md")
    write(path, text + "\n")
    print(f"bench: written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
