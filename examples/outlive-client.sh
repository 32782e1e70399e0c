#!/bin/sh
# A small org.outlive.Agent1 client with busctl: read the guard posture, queue a run for
# revival, report a safety system's status and wait for the posture change. The interfaces
# are documented in docs/dbus/. Usage:
#
#     outlive-client.sh RUN_ID [GUARD_KEY]
#
# Queueing needs root or the group `outlive`; waiting for the signal (busctl monitor) needs
# root. It talks to the system bus ($DBUS_SYSTEM_BUS_ADDRESS when set).
set -eu
run_id=${1:?usage: outlive-client.sh RUN_ID [GUARD_KEY]}
guard=${2:-}
name=org.outlive.Agent1

# 1. The posture: the count of guards per state.
busctl get-property "$name" /org/outlive/Agent1/Guards org.outlive.Guards1 Summary

# 2. Queue a reaped run: Enqueue(a{sv}) -> (b admitted, s why, s id).
now_ms=$(($(date +%s) * 1000))
busctl call "$name" /org/outlive/Agent1/ResumeQueue org.outlive.ResumeQueue1 Enqueue 'a{sv}' 7 \
    run_id s "$run_id" \
    exec as 1 /bin/true \
    cwd s / \
    session s "shell example" \
    reason s "reaped by the shell example" \
    evidence as 1 active-subagent \
    reaped_at x "$now_ms"

# 3. Report a guard you declared in /etc/outlive/guards.d/ and wait for PostureChanged.
if [ -n "$guard" ]; then
    out=$(mktemp)
    trap 'rm -f "$out"' EXIT
    timeout 20 busctl monitor --match \
        "type='signal',interface='org.outlive.Guards1',member='PostureChanged'" \
        >"$out" 2>&1 &
    monitor=$!
    sleep 1
    busctl call "$name" /org/outlive/Agent1/Guards org.outlive.Guards1 ReportGuard 'sbbta{sv}' \
        "$guard" true false "$now_ms" 0
    i=0
    while ! grep -q 'Member=PostureChanged' "$out"; do
        i=$((i + 1))
        if [ "$i" -gt 150 ] || ! kill -0 "$monitor" 2>/dev/null; then
            echo "no PostureChanged after reporting $guard" >&2
            exit 1
        fi
        sleep 0.1
    done
    kill "$monitor" 2>/dev/null || true
    echo "PostureChanged after reporting $guard"
fi
