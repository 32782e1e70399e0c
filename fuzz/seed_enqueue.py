#!/usr/bin/env python3
"""Seeds for the enqueue_dict target: Enqueue dictionaries (a{sv}) in the D-Bus little-endian
wire format, valid ones and ones with wrong types, unknown keys and oversized values.
Usage: fuzz/seed_enqueue.py fuzz/corpus/enqueue_dict"""
import struct
import sys


class W:
    def __init__(self):
        self.b = bytearray()

    def pad(self, n):
        while len(self.b) % n:
            self.b.append(0)

    def u32(self, v):
        self.pad(4)
        self.b += struct.pack("<I", v)

    def u64(self, v):
        self.pad(8)
        self.b += struct.pack("<Q", v)

    def s(self, v):
        e = v.encode()
        self.u32(len(e))
        self.b += e + b"\0"

    def sig(self, v):
        self.b += bytes([len(v)]) + v.encode() + b"\0"

    def value(self, t, v):
        if t == "s":
            self.s(v)
        elif t in ("b", "u"):
            self.u32(int(v))
        elif t == "t":
            self.u64(v)
        elif t == "as":
            self.u32(0)
            at = len(self.b) - 4
            self.pad(4)
            start = len(self.b)
            for x in v:
                self.s(x)
            struct.pack_into("<I", self.b, at, len(self.b) - start)
        elif t == "a{ss}":
            self.u32(0)
            at = len(self.b) - 4
            self.pad(8)
            start = len(self.b)
            for k, x in v.items():
                self.pad(8)
                self.s(k)
                self.s(x)
            struct.pack_into("<I", self.b, at, len(self.b) - start)
        else:
            raise ValueError(t)


def asv(items):
    w = W()
    w.u32(0)
    at = len(w.b) - 4
    w.pad(8)
    start = len(w.b)
    for k, (t, v) in items:
        w.pad(8)
        w.s(k)
        w.sig(t)
        w.value(t, v)
    struct.pack_into("<I", w.b, at, len(w.b) - start)
    return bytes(w.b)


SEEDS = {
    "unit": [("run_id", ("s", "agent-7")), ("unit", ("s", "agent@7.service")),
             ("evidence", ("as", ["active-subagent"])), ("reason", ("s", "age-limit"))],
    "exec": [("run_id", ("s", "build-42")), ("exec", ("as", ["/usr/bin/make", "all"])),
             ("cwd", ("s", "/home/dev/proj")), ("env", ("a{ss}", {"LANG": "C", "X": "1"})),
             ("evidence", ("as", ["build-or-autonomous-active"])), ("reaped_at", ("t", 1795000000000)),
             ("user", ("u", 1000)), ("group", ("u", 1000)), ("active_run", ("b", 1))],
    "job": [("job", ("s", "nightly")), ("resume_on_reap", ("b", 1)), ("session", ("s", "tmux:3")),
            ("disposition", ("s", "recovery-bounce")), ("origin", ("s", "operator")),
            ("worktree", ("s", "/srv/w")), ("run_state_file", ("s", "/run/user/1000/r.json")),
            ("exec", ("as", ["/bin/true"]))],
    "wrong-type": [("run_id", ("u", 7)), ("exec", ("s", "/bin/true"))],
    "unknown-key": [("run_id", ("s", "a")), ("colour", ("s", "blue"))],
    "oversized": [("run_id", ("s", "r" * 5000)), ("exec", ("as", ["/bin/echo"] + ["x" * 100] * 300))],
    "relative": [("run_id", ("s", "r")), ("exec", ("as", ["bin/true"])), ("cwd", ("s", "rel/dir"))],
    "forbidden-env": [("run_id", ("s", "r")), ("exec", ("as", ["/bin/true"])),
                      ("env", ("a{ss}", {"LD_PRELOAD": "/x.so", "OUTLIVE_X": "1"}))],
    "empty": [],
}

out = sys.argv[1]
for name, items in SEEDS.items():
    with open(f"{out}/seed-{name}", "wb") as f:
        f.write(asv(items))
