# Pre-uninstall scriptlet of outlive (RPM). Written out literally: cargo-generate-rpm expands no macros.
# $1 is 0 on erase, 1 or more on upgrade (the new version is already installed).
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now outlived.service >/dev/null 2>&1 || :
fi
