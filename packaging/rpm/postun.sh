# Post-uninstall scriptlet of outlive (RPM). Written out literally: cargo-generate-rpm expands no macros.
# $1 is 0 on erase, 1 or more on upgrade.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    journalctl --update-catalog >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    # Upgrade: restart the agent on the new binary if it was running.
    systemctl try-restart outlived.service >/dev/null 2>&1 || :
fi
# Erase keeps /var/lib/outlive (the queue and its audit trail), as RPM packages keep data.
