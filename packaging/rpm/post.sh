# Post-install scriptlet of outlive (RPM). Written out literally: cargo-generate-rpm expands no macros.
# $1 is 1 on install, 2 or more on upgrade.
# The group first: dbus-daemon resolves <policy group="outlive"> when it loads its configuration.
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/outlive.conf || :
elif ! getent group outlive >/dev/null; then
    groupadd --system outlive || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
        ReloadConfig >/dev/null 2>&1 || :
    journalctl --update-catalog >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    # As the systemd_post scriptlet does: the distribution's presets decide whether the unit is
    # enabled on install (Fedora and RHEL enable no service a package brings by default).
    systemctl --no-reload preset outlived.service >/dev/null 2>&1 || :
fi
