# outlive: build, install, test. See README.md.
#
#   make                 release build
#   make test            the whole test suite (what CI runs, through .ci/run)
#   make install         install under $(DESTDIR)$(PREFIX) (PREFIX=/usr/local by default)
#   make uninstall       remove what install put there
#
# The D-Bus policy always goes to /usr/share/dbus-1/system.d: the system bus reads no other
# place, whatever the PREFIX. With another PREFIX the installed unit's ExecStart= names the
# installed binary.

PREFIX ?= /usr/local
DESTDIR ?=
CARGO ?= cargo
PROFILE ?= release
TARGET_DIR ?= target
OUTLIVED ?= $(TARGET_DIR)/$(PROFILE)/outlived
OUTLIVECTL ?= $(TARGET_DIR)/$(PROFILE)/outlivectl

SBINDIR := $(PREFIX)/sbin
BINDIR := $(PREFIX)/bin
UNITDIR := $(PREFIX)/lib/systemd/system
# journalctl reads catalogs from /usr/lib/systemd/catalog and /usr/local/lib/systemd/catalog.
CATALOGDIR := $(PREFIX)/lib/systemd/catalog
DBUSPOLICYDIR := /usr/share/dbus-1/system.d

NEXTEST := $(CARGO) nextest run --features fault-hooks --profile ci

.PHONY: all build test test-fast test-box test-release lint install uninstall clean

all: build

build:
	$(CARGO) build --release --locked

# The whole suite: unit and integration tests in parallel, then the systemd-in-a-box tests one
# at a time (they share the machine's cgroup tree and check that the host is left unchanged).
test: lint test-fast test-box test-release

test-fast:
	$(NEXTEST) -E 'not binary(box_e2e)'

test-box:
	$(NEXTEST) -E 'binary(box_e2e)'

# The fault hooks (DESIGN §4.5) exist only with --features fault-hooks: the release build
# must not contain them.
test-release:
	$(CARGO) build --release --locked
	@if grep -q "fault-wedge-" $(TARGET_DIR)/release/outlived; then \
		echo "the release build contains the fault hooks"; exit 1; \
	else echo "release build: no fault hooks"; fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --features fault-hooks --locked -- -D warnings

$(OUTLIVED) $(OUTLIVECTL):
	$(CARGO) build --release --locked

install: $(OUTLIVED) $(OUTLIVECTL)
	install -D -m 0755 $(OUTLIVED) $(DESTDIR)$(SBINDIR)/outlived
	install -D -m 0755 $(OUTLIVECTL) $(DESTDIR)$(BINDIR)/outlivectl
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|^ExecStart=/usr/sbin/outlived|ExecStart=$(SBINDIR)/outlived|' systemd/outlived.service \
		> $(DESTDIR)$(UNITDIR)/outlived.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/outlived.service
	install -D -m 0644 systemd/org.outlive.Agent1.conf $(DESTDIR)$(DBUSPOLICYDIR)/org.outlive.Agent1.conf
	install -D -m 0644 systemd/outlive.catalog $(DESTDIR)$(CATALOGDIR)/outlive.catalog
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
		journalctl --update-catalog; \
	fi

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/outlived $(DESTDIR)$(BINDIR)/outlivectl
	rm -f $(DESTDIR)$(UNITDIR)/outlived.service
	rm -f $(DESTDIR)$(DBUSPOLICYDIR)/org.outlive.Agent1.conf
	rm -f $(DESTDIR)$(CATALOGDIR)/outlive.catalog
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
	fi

clean:
	$(CARGO) clean
