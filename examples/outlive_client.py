#!/usr/bin/env python3
"""A small org.outlive.Agent1 client with dbus-next (pip install dbus-next).

It reads the guard posture, queues a run for revival, reports the status of a safety system
that declared itself in /etc/outlive/guards.d/, and waits for the agent to announce the
posture change. The interfaces are documented in docs/dbus/.

    outlive_client.py --report-guard backup.snapshots

Run it as root or as a member of the group `outlive` (queueing a run needs either); reading
the posture and reporting a guard you own need neither. It talks to the system bus
($DBUS_SYSTEM_BUS_ADDRESS when set).
"""

import argparse
import asyncio
import os
import sys
import time

from dbus_next import BusType, Variant
from dbus_next.aio import MessageBus

NAME = "org.outlive.Agent1"
GUARDS = "/org/outlive/Agent1/Guards"
QUEUE = "/org/outlive/Agent1/ResumeQueue"


async def interface(bus, path, name):
    introspection = await bus.introspect(NAME, path)
    return bus.get_proxy_object(NAME, path, introspection).get_interface(name)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-id", default=f"example-{os.getpid()}")
    ap.add_argument("--report-guard", metavar="KEY", help="a drop-in guard of yours to report on")
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    guards = await interface(bus, GUARDS, "org.outlive.Guards1")
    queue = await interface(bus, QUEUE, "org.outlive.ResumeQueue1")

    # 1. The posture: how many guards are in each state, and what needs attention.
    summary = await guards.get_summary()
    on = {k: v for k, v in summary.items() if v}
    print("posture:", ", ".join(f"{k} {v}" for k, v in sorted(on.items())))
    for anomaly in await guards.get_anomalies():
        print("anomaly:", anomaly)

    changed = asyncio.get_running_loop().create_future()

    def on_posture_changed(rows):
        if not changed.done():
            changed.set_result(rows)

    guards.on_posture_changed(on_posture_changed)

    # 2. Queue a run that was reaped (Enqueue's keys and types: docs/dbus).
    request = {
        "run_id": Variant("s", args.run_id),
        "session": Variant("s", "example session"),
        "exec": Variant("as", ["/bin/true"]),
        "cwd": Variant("s", "/"),
        "reason": Variant("s", "reaped by the example"),
        "evidence": Variant("as", ["active-subagent"]),
        # Any integer type that fits is taken; a plain Python int is sent as what you say.
        "reaped_at": Variant("x", int(time.time() * 1000)),
    }
    admitted, why, entry_id = await queue.call_enqueue(request)
    print(f"enqueue: admitted={admitted} why={why!r} id={entry_id!r}")

    # 3. A safety system reports that it is on; the agent announces the changed row.
    if args.report_guard:
        now_ms = int(time.time() * 1000)
        await guards.call_report_guard(args.report_guard, True, False, now_ms, {})
        rows = await asyncio.wait_for(changed, args.timeout)
        for row in rows:
            print(f"PostureChanged: {row['key'].value} is {row['effective'].value}")
    return 0 if admitted else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
