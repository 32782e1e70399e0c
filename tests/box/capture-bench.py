#!/usr/bin/python3
"""Capture time against its floor (issue 14, item 10), inside a box with outlived running.

For each of N runs started with `outlivectl run`: SIGKILL its main process and take
  - capture: from the kill to the journal's receipt of outlived's `run-captured` event, which
    outlived records only after the entry is durable (state file fsynced, renamed, directory
    fsynced), so this is an upper bound of "kill to durable";
  - signal: from the kill to the arrival, at a separate subscribed client (`busctl monitor`),
    of the unit's PropertiesChanged with ActiveState=failed.
Then the median of one fsync of a file of the state file's size on the state filesystem.
Then, with W runs watched and the agent idle, its CPU time over S seconds and its VmRSS.
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
size = os.path.getsize(os.path.join(STATE_DIR, "resume-queue.json"))
fsyncs = []
probe = os.path.join(STATE_DIR, "fsync-probe")
for _ in range(N):
    with open(probe, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        t = time.perf_counter()
        os.fsync(f.fileno())
        fsyncs.append((time.perf_counter() - t) * 1000)
os.unlink(probe)

for i in range(W):
    sh("outlivectl", "run", "--run-id", "idle-%d" % i, "--", "sleep", "100000")
pid = int(sh("systemctl", "show", "-P", "MainPID", "outlived"))
time.sleep(10)  # let the starts settle (the next passes adopt nothing new)


def cpu_ticks():
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


c0 = cpu_ticks()
time.sleep(S)
c1 = cpu_ticks()
rss = [l for l in open("/proc/%d/status" % pid) if l.startswith("VmRSS")][0].split()[1]
hz = os.sysconf("SC_CLK_TCK")
med = statistics.median
print(json.dumps({
    "kills": N,
    "capture_ms": {"median": round(med(capture), 2), "min": round(min(capture), 2), "max": round(max(capture), 2)},
    "signal_ms": {"median": round(med(signal), 2)},
    "fsync_ms": {"median": round(med(fsyncs), 2), "bytes": size},
    "floor_ms": round(med(signal) + med(fsyncs), 2),
    "ratio": round(med(capture) / (med(signal) + med(fsyncs)), 2),
    "watched": W,
    "idle_secs": S,
    "idle_cpu_s": (c1 - c0) / hz,
    "idle_cpu_percent": round(100.0 * (c1 - c0) / hz / S, 4),
    "vmrss_kib": int(rss),
}))
