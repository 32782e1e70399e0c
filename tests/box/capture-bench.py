#!/usr/bin/python3
"""Capture time against its floor (issue 14, item 10), inside a box with outlived running.

For each of N runs started with `outlivectl run`: SIGKILL its main process and take
  - capture: from the kill to the journal's receipt of outlived's `run-captured` event, which
    outlived records only after the entry is durable (state file fsynced, renamed, directory
    fsynced), so this is an upper bound of "kill to durable";
  - signal: from the kill to the arrival, at a separate subscribed client (`busctl monitor`),
    of the unit's PropertiesChanged with ActiveState=failed.
Then the median of one fsync of a file of the state file's size on the state filesystem.
Then, with W runs watched and the agent idle, its CPU time over S seconds (in all and per
thread, from schedstat) and its VmRSS (in all and per mapping). BENCH_MALLOC_STATS=1 also prints
the allocator's own figures before the watched runs and after the idle period (through gdb).
Prints one JSON object.
"""
import json, os, statistics, subprocess, sys, threading, time

N = int(os.environ.get("BENCH_KILLS", "21"))
W = int(os.environ.get("BENCH_WATCHED", "200"))
S = int(os.environ.get("BENCH_IDLE_SECS", "60"))
STATE_DIR = "/var/lib/outlive"


def sh(*args):
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()


def unit_path(unit):
    out = "/org/freedesktop/systemd1/unit/"
    for b in unit.encode():
        c = chr(b)
        out += c if c.isalnum() else "_%02x" % b
    return out


failed_at = {}
monitors = []
def monitor():
    p = subprocess.Popen(
        ["busctl", "monitor", "--json=short",
         "--match", "type='signal',sender='org.freedesktop.systemd1',member='PropertiesChanged'"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    monitors.append(p)
    for line in p.stdout:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        data = m.get("payload", {}).get("data", [])
        if len(data) >= 2 and data[0] == "org.freedesktop.systemd1.Unit":
            st = data[1].get("ActiveState", {}).get("data")
            if st == "failed" and m.get("path") not in failed_at:
                failed_at[m["path"]] = m["timestamp-realtime"] / 1e6


threading.Thread(target=monitor, daemon=True).start()
time.sleep(1)
capture, signal = [], []
for i in range(N):
    run_id = "bench-%d" % i
    unit = json.loads(sh("outlivectl", "--json", "run", "--run-id", run_id, "--", "sleep", "100000"))["unit"]
    pid = int(sh("systemctl", "show", "-P", "MainPID", unit))
    time.sleep(0.3)
    t0 = time.time()
    os.kill(pid, 9)
    deadline = t0 + 10
    captured = None
    while time.time() < deadline and captured is None:
        out = sh("journalctl", "-o", "json", "--no-pager", "OUTLIVE_EVENT=run-captured", "OUTLIVE_RUN_ID=" + run_id)
        for line in out.splitlines():
            captured = int(json.loads(line)["__REALTIME_TIMESTAMP"]) / 1e6
        if captured is None:
            time.sleep(0.05)
    path = unit_path(unit)
    while time.time() < deadline and path not in failed_at:
        time.sleep(0.01)
    if captured is None or path not in failed_at:
        print(json.dumps({"error": "run %s: captured=%s signal=%s" % (run_id, captured, failed_at.get(path))}))
        for p in monitors:
            p.kill()
        sys.exit(1)
    capture.append((captured - t0) * 1000)
    signal.append((failed_at[path] - t0) * 1000)

for p in monitors:
    p.kill()
state_file = os.path.join(STATE_DIR, "resume-queue.json")
size = os.path.getsize(state_file) if os.path.exists(state_file) else 0
fsyncs = []
probe = os.path.join(STATE_DIR, "fsync-probe")
for _ in range(N):
    with open(probe, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        t = time.perf_counter()
        os.fsync(f.fileno())
        fsyncs.append((time.perf_counter() - t) * 1000)
if fsyncs:
    os.unlink(probe)

pid = int(sh("systemctl", "show", "-P", "MainPID", "outlived"))


def malloc_stats(label):
    """An experiment (BENCH_MALLOC_STATS=1): the allocator's own figures, through gdb."""
    if not os.environ.get("BENCH_MALLOC_STATS"):
        return
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (void)malloc_stats()"],
                   capture_output=True)
    time.sleep(0.5)
    out = sh("journalctl", "-u", "outlived", "-n", "8", "-o", "cat", "--no-pager")
    print("malloc_stats %s: %s" % (label, " | ".join(out.splitlines()[-6:])), file=sys.stderr)


malloc_stats("before the watched runs")
for i in range(W):
    sh("outlivectl", "run", "--run-id", "idle-%d" % i, "--", "sleep", "100000")
time.sleep(10)  # let the starts settle (the next passes adopt nothing new)


def cpu_ticks():
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def threads():
    """Per thread: name and time on the CPU in ns (schedstat's first field)."""
    out = {}
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            name = open("/proc/%d/task/%s/comm" % (pid, t)).read().strip()
            ns = int(open("/proc/%d/task/%s/schedstat" % (pid, t)).read().split()[0])
        except OSError:
            continue
        out["%s/%s" % (name, t)] = ns
    return out


c0 = cpu_ticks()
t0 = threads()
time.sleep(S)
c1 = cpu_ticks()
t1 = threads()
rss = [l for l in open("/proc/%d/status" % pid) if l.startswith("VmRSS")][0].split()[1]
rollup = {}
for l in open("/proc/%d/smaps_rollup" % pid):
    k, _, v = l.partition(":")
    if k in ("Rss", "Pss_Anon", "Pss_File", "Anonymous", "Private_Dirty", "Shared_Clean"):
        rollup[k] = int(v.split()[0])
malloc_stats("after the idle period")
maps = {}
name = None
for l in open("/proc/%d/smaps" % pid):
    f = l.split()
    if "-" in f[0] and ":" not in f[0]:
        name = f[5] if len(f) > 5 else "[anon]"
    elif f[0] == "Rss:":
        maps[name] = maps.get(name, 0) + int(f[1])
maps = {k: v for k, v in sorted(maps.items(), key=lambda kv: -kv[1]) if v >= 64}
hz = os.sysconf("SC_CLK_TCK")
med = statistics.median
def m(xs):
    return round(med(xs), 2) if xs else None
print(json.dumps({
    "kills": N,
    "capture_ms": {"median": m(capture), "min": round(min(capture), 2) if capture else None, "max": round(max(capture), 2) if capture else None},
    "signal_ms": {"median": m(signal)},
    "fsync_ms": {"median": m(fsyncs), "bytes": size},
    "floor_ms": round(med(signal) + med(fsyncs), 2) if N else None,
    "ratio": round(med(capture) / (med(signal) + med(fsyncs)), 2) if N else None,
    "smaps_rollup_kib": rollup,
    "rss_by_mapping_kib": maps,
    "threads_cpu_us": {k: round((v - t0.get(k, 0)) / 1000) for k, v in sorted(t1.items())},
    "watched": W,
    "idle_secs": S,
    "idle_cpu_s": (c1 - c0) / hz,
    "idle_cpu_percent": round(100.0 * (c1 - c0) / hz / S, 4),
    "vmrss_kib": int(rss),
}))
