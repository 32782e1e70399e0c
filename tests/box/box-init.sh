#!/bin/bash
# PID 1 of the outlive test box (DESIGN §4.3). Started as
#   setsid unshare --fork --pid --mount-proc --mount --uts --ipc --net --propagation private \
#       tests/box/box-init.sh <stage-dir>
# It isolates the box from the machine, installs the stage's tree, then execs systemd.
#
# Why each step: a booting systemd runs tmpfiles (which EMPTIES /tmp), writes under /etc and
# /var, creates /dev/log, /dev/hugepages, /dev/mqueue, and libmount records mounts in
# /run/mount/utab. So: nothing propagates (rprivate, mount -n), /run and /mnt are fresh tmpfs
# first, /etc /var /usr are overlays whose upper layers live on that tmpfs (Debian is
# merged-/usr, so packages installed in the box stay in the box), /dev is a private tmpfs with
# the device nodes the tests need bound in, host-global units are masked, the box boots a
# target of its own, and container= keeps PID 1 from writing host-global kernel settings.
set -euo pipefail
STAGE=$1

mount -n --make-rprivate /
mount -n -t tmpfs -o mode=755 tmpfs /run
mount -n -t tmpfs -o mode=755 tmpfs /mnt

# /home and /root too: tests create users with homes, and nothing of that may reach the machine.
for d in etc var usr home root; do
  mkdir -p "/mnt/$d.up" "/mnt/$d.work"
  mount -n -t overlay overlay -o "lowerdir=/$d,upperdir=/mnt/$d.up,workdir=/mnt/$d.work" "/$d"
done

# Container images ship /usr/sbin/policy-rc.d answering 101 ("no services may start"): a host
# booted with systemd has none, and a package installed in the box must start its unit.
rm -f /usr/sbin/policy-rc.d

# Install what the test staged (make install DESTDIR=…, configuration, units), into the
# overlays only: copying the stage's top directory itself (`cp -a root/. /`) would give the
# machine's own / the stage's mode and times.
for e in "$STAGE/root"/* "$STAGE/root"/.[!.]*; do
  [ -e "$e" ] || continue
  d=${e##*/}
  case "$d" in
    etc|var|usr|home|root) cp -a "$e/." "/$d/" ;;
    *) echo "box-init: the stage has /$d, which is not an overlay: it would reach the machine" >&2
       exit 1 ;;
  esac
done

# The state directory on its own ext4 image, so it reads local-persistent (on the overlay it
# would read local-volatile and the posture would rightly say so).
# (Only when the test asks for it: a package test checks that purge leaves nothing behind.)
if [ -f "$STAGE/state.img" ]; then
  mkdir -p /var/lib/outlive
  mount -n -o loop "$STAGE/state.img" /var/lib/outlive
fi
# Files the test put there before the agent starts (a foreign lock, a state file), mtimes kept.
if [ -d "$STAGE/state" ]; then
  mkdir -p /var/lib/outlive
  cp -a "$STAGE/state/." /var/lib/outlive/
fi

# systemd remounts /sys/fs/cgroup (a tmpfs on hybrid hosts) read-only and resizes it, and a
# remount changes the superblock, which the box would share with the machine. The box gets a
# tmpfs of its own with the machine's hierarchies bound into it.
if mountpoint -q /sys/fs/cgroup && [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ]; then
  mkdir /mnt/cgroup
  mount -n -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs /mnt/cgroup
  for d in /sys/fs/cgroup/*; do
    name=${d##*/}
    if [ -L "$d" ]; then
      cp -P "$d" /mnt/cgroup/
    elif mountpoint -q "$d"; then
      mkdir "/mnt/cgroup/$name"
      mount -n --bind "$d" "/mnt/cgroup/$name"
    fi
  done
  mount -n --move /mnt/cgroup /sys/fs/cgroup
fi

# Kernel settings are the machine's: systemd as PID 1 raises fs.file-max and fs.nr_open at boot
# even with container= set. Read-only here, as in any container (the box's systemd notes it
# and carries on).
mount -n --bind /proc/sys /proc/sys
mount -n -o remount,bind,ro /proc/sys
# A host restart (DESIGN §4.3): another boot id, in this mount namespace only (over the
# read-only /proc/sys bind, which would otherwise hide it).
if [ -f "$STAGE/boot_id" ]; then
  mount -n --bind "$STAGE/boot_id" /proc/sys/kernel/random/boot_id
fi

# A private /dev with just the nodes the tests use.
mkdir /mnt/dev
mount -n -t tmpfs -o mode=755,nosuid tmpfs /mnt/dev
for n in null zero full random urandom tty fuse loop-control; do
  [ -e "/dev/$n" ] || continue
  touch "/mnt/dev/$n"
  mount -n --bind "/dev/$n" "/mnt/dev/$n"
done
for n in /dev/loop[0-9]*; do
  [ -b "$n" ] || continue
  touch "/mnt$n"
  mount -n --bind "$n" "/mnt$n"
done
touch /mnt/dev/console
mount -n --bind /dev/null /mnt/dev/console
mkdir /mnt/dev/pts /mnt/dev/shm
mount -n -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /mnt/dev/pts
ln -s pts/ptmx /mnt/dev/ptmx
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /mnt/dev/shm
ln -s /proc/self/fd /mnt/dev/fd
ln -s /proc/self/fd/0 /mnt/dev/stdin
ln -s /proc/self/fd/1 /mnt/dev/stdout
ln -s /proc/self/fd/2 /mnt/dev/stderr
mount -n --move /mnt/dev /dev

# Units that would touch the machine (or are useless in the box).
mkdir -p /etc/systemd/system
for u in systemd-journald-dev-log.socket systemd-timesyncd.service systemd-sysctl.service \
         systemd-modules-load.service systemd-udevd.service systemd-udev-trigger.service \
         systemd-binfmt.service systemd-remount-fs.service systemd-random-seed.service \
         proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount dev-hugepages.mount \
         dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
         sys-fs-fuse-connections.mount sys-kernel-config.mount getty@.service \
         serial-getty@.service console-getty.service postgresql.service; do
  ln -sf /dev/null "/etc/systemd/system/$u"
done

wants="systemd-journald.service dbus.service"
if [ -f "$STAGE/wants" ]; then
  wants="$wants $(tr '\n' ' ' < "$STAGE/wants")"
fi
cat > /etc/systemd/system/outlive-test.target <<TARGET
[Unit]
Description=outlive test box
DefaultDependencies=no
Wants=$wants
TARGET

# Last: a fresh /tmp (tmpfiles will clean it; the machine's /tmp is not visible from here on).
mount -n -t tmpfs -o mode=1777 tmpfs /tmp

exec env -i container=outlive-test \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --system --unit=outlive-test.target
