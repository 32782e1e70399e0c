#!/usr/bin/env python3
"""Named seeds for the lock_decision and state_salvage targets: the inputs of the core review
of 2026-11-30 (a lock record whose host_id or boot_id has one dash too many; three entries, one
carrying a status word from a newer version; a whole file cut short) and the other edges the
amended rules name (a future mtime, a fresh heartbeat, a FUSE state directory, a pause or a
global stop that cannot be read, duplicate ids). `cargo fuzz cmin` drops files whose coverage
others have: run this again after it.
Usage: fuzz/seed_core_review.py fuzz/corpus"""
import json
import os
import sys

corpus = sys.argv[1] if len(sys.argv) > 1 else "corpus"
BAD = "01234567-89ab-cdef-0123-4567-9abcdef"


def rec(**kw):
    r = {"version": 1, "host_id": "0123456789abcdef0123456789abcdef", "hostname": "other",
         "boot_id": "fedcba9876543210fedcba9876543210", "pid": 4194000, "pid_start": 12345,
         "pid_ns": 4026531836, "acquired_at": 1700000000000, "agent_version": "0.0.9"}
    r.update(kw)
    return (json.dumps(r) + "\n").encode()


# Four control bytes (fuzz_targets/lock_decision.rs): what was observed (0 locked, 1 busy),
# the filesystem class (0 local-persistent, 5 unknown), liveness and heartbeat age, auto_heal
# (0 off, 2 on); then the lock file's bytes.
lock = {
    "seed-reviewer-host-id-one-dash-too-many": b"\x00\x00\x03\x00" + rec(host_id=BAD),
    "seed-reviewer-boot-id-one-dash-too-many-auto-heal-on": b"\x00\x00\x03\x02" + rec(boot_id=BAD),
    "seed-reviewer-both-ids-held-by-another": b"\x01\x00\x03\x02" + rec(host_id=BAD, boot_id=BAD),
    "seed-future-mtime-clock-skew": b"\x00\x00\x05\x02" + rec(),
    "seed-fresh-heartbeat-row10": b"\x00\x00\x06\x02" + rec(),
    "seed-fuse-holder-never-probed": b"\x00\x05\x83\x02" + rec(),
    "seed-empty-record": b"\x00\x00\x00\x02",
    # Found by make fuzz-smoke (2026-11-30): a hostname that says "delete", quoted in the
    # message, is the record's word, not outlived's.
    "seed-fuzz-unsafe-dir-says-delete": b"\x09\x09\x09\x09" + rec(hostname="please delete me"),
    "seed-fuzz-hostname-says-delete": b"\x00\x00\x83\x00" + rec(hostname="please delete me"),
}


def entry(i, status):
    return {"id": i, "run_id": "run-" + i, "session": "s", "target": {"exec": ["/bin/true"]},
            "uid": 0, "gid": 0, "cwd": "/", "class": "interactive", "status": status,
            "reaped_at": 1, "queued_at": 2}


state = {
    "seed-reviewer-three-entries-one-from-a-newer-version": {
        "version": 1, "entries": [entry("rq-a-1", "queued"), entry("rq-b-1", "frobbed"),
                                  entry("rq-c-1", "queued")]},
    "seed-pause-unreadable": {"version": 1, "pause": {"kind": "nap"}},
    "seed-global-stop-unreadable-halt-kept": {
        "version": 1, "global_stop": "yesterday",
        "pause": {"kind": "deliberate-halt", "reason": "r", "paused_at": 5}},
    "seed-duplicate-ids": {"version": 1, "entries": [entry("rq-a-1", "queued"),
                                                     entry("rq-a-1", "cancelled")]},
    "seed-entries-not-an-array": {"version": 1, "entries": 7},
    "seed-ledger-and-stops-half-bad": {
        "version": 1, "ledger": {"run:x": [1, 2], "run:y": "often"},
        "stops": [{"run_id": "r", "at": 3}, {"run_id": 4}]},
    "seed-id-floor-in-a-bad-entry": {
        "version": 1, "last_id_ms": 5, "entries": [{"id": "rq-zzzzzzzzzzzz-1", "status": 7}]},
}

os.makedirs(f"{corpus}/lock_decision", exist_ok=True)
os.makedirs(f"{corpus}/state_salvage", exist_ok=True)
for name, data in lock.items():
    with open(f"{corpus}/lock_decision/{name}", "wb") as f:
        f.write(data)
for name, doc in state.items():
    with open(f"{corpus}/state_salvage/{name}", "w") as f:
        f.write(json.dumps(doc))
with open(f"{corpus}/state_salvage/seed-reviewer-whole-file-cut-short", "w") as f:
    f.write('{"version": 1, "entries": [{"id": 5}')
