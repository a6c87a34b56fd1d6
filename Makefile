# odmr - On-Demand Mail Relay server and client.
#   make                 build everything (installs missing build packages)
#   make check           build and run all tests; last line "N passed, N failed"
#   make check SANITIZE=1  the same with ASan + UBSan
#   make bench           benchmarks against Postfix / fetchmail in one run
#   make run             demo provider on loopback (see README.md)
#   make install PREFIX=/usr/local DESTDIR=
#   make deb             Debian packages odmrd and odmr-fetch in build/deb/

PREFIX     ?= /usr/local
SBINDIR    ?= $(PREFIX)/sbin
BINDIR     ?= $(PREFIX)/bin
MANDIR     ?= $(PREFIX)/share/man
# /usr installs keep their configuration in /etc, as packages do.
SYSCONFDIR ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
DOCDIR     ?= $(PREFIX)/share/doc/odmr

CC      ?= cc
B       := build
WARN    := -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wstrict-prototypes \
           -Wmissing-prototypes -Wvla -Wpointer-arith
STD     := -std=c11 -D_DEFAULT_SOURCE -D_XOPEN_SOURCE=700
DEFS    := -DSYSCONFDIR='"$(SYSCONFDIR)"'
ifeq ($(SANITIZE),1)
OPT     := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
           -fno-sanitize-recover=undefined
LDSAN   := -fsanitize=address,undefined
B       := build-san
else
OPT     := -O2 -g -D_FORTIFY_SOURCE=2
endif
HARDEN  := -fstack-protector-strong -fPIE
CFLAGS  += $(STD) $(WARN) $(OPT) $(HARDEN) $(DEFS)
LDFLAGS += -pie -Wl,-z,relro,-z,now $(LDSAN)
LIBS_SSL  := -lssl -lcrypto
LIBS_SASL := -lsasl2
LIBS_GDBM := -lgdbm
LIBS_IDN  := -lidn2

COMMON_SRC := $(wildcard common/*.c)
SERVER_LIB_SRC := $(wildcard server/conf.c server/envelope.c server/queue.c \
                  server/accounts.c server/auxprop.c server/bounce.c server/expire.c \
                  server/downgrade.c server/throttle.c server/recipients.c \
                  server/milter.c server/milter_edit.c server/qfile.c \
                  server/data_stream.c)
# odmrctl switches users the way odmrd does (server/ownership.h).
SERVER_LIB_SRC += server/ownership.c
ODMRD_SRC  := $(filter-out server/odmrctl%.c $(SERVER_LIB_SRC),$(wildcard server/*.c))
CLIENT_SRC := $(wildcard client/*.c)
UNIT_SRC   := $(wildcard tests/unit/test_*.c)
# make bench: what the file system and OpenSSL allow at best (tests/floor)
FLOOR_SRC  := $(wildcard tests/floor/*_floor.c)

obj = $(patsubst %.c,$(B)/obj/%.o,$(1))
COMMON_OBJ := $(call obj,$(COMMON_SRC))
SERVER_LIB_OBJ := $(call obj,$(SERVER_LIB_SRC))
PROGRAMS := $(B)/odmrd $(B)/odmrctl $(B)/odmr-fetch
UNIT_BIN := $(patsubst tests/unit/%.c,$(B)/tests/%,$(UNIT_SRC))
FLOOR_BIN := $(patsubst tests/floor/%.c,$(B)/floor/%,$(FLOOR_SRC))

.PHONY: all deps check bench run install clean test-deps deb
all: deps $(PROGRAMS)

deps:
	@sh tools/deps.sh build

# After deps: under make -j two apt-get runs would race for dpkg's lock.
test-deps: deps
	@sh tools/deps.sh test

# SYSCONFDIR is compiled in (the default configuration path): a stamp that
# changes only with its value makes "make SYSCONFDIR=/etc" rebuild a tree
# that was built with the default.
SYSCONF_STAMP := $(B)/sysconfdir.stamp
$(SYSCONF_STAMP): FORCE
	@mkdir -p $(B)
	@echo '$(SYSCONFDIR)' | cmp -s - $@ 2>/dev/null || echo '$(SYSCONFDIR)' > $@
.PHONY: FORCE
FORCE:

$(B)/obj/%.o: %.c $(SYSCONF_STAMP) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(B)/odmrd: $(call obj,$(ODMRD_SRC)) $(SERVER_LIB_OBJ) $(COMMON_OBJ)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS_SASL) $(LIBS_SSL) $(LIBS_GDBM) $(LIBS_IDN)

$(B)/odmrctl: $(call obj,$(wildcard server/odmrctl*.c)) $(SERVER_LIB_OBJ) $(COMMON_OBJ)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS_SASL) $(LIBS_SSL) $(LIBS_GDBM) $(LIBS_IDN)

$(B)/odmr-fetch: $(call obj,$(CLIENT_SRC)) $(COMMON_OBJ)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS_SASL) $(LIBS_SSL) $(LIBS_IDN)

# client/lock.o: odmr-fetch's lock, the one client part with unit tests
$(B)/tests/%: tests/unit/%.c $(SERVER_LIB_OBJ) $(COMMON_OBJ) $(B)/obj/client/lock.o
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS_SASL) $(LIBS_SSL) $(LIBS_GDBM) $(LIBS_IDN)

# A test-only LD_PRELOAD (tests/shim): built without the sanitizers, which
# want their own runtime first and need nothing from this one.
SHIM_BIN := $(B)/tests/accept_shim.so
$(SHIM_BIN): tests/shim/accept_shim.c
	@mkdir -p $(dir $@)
	$(CC) $(STD) $(WARN) -O2 -fPIC -shared -o $@ $< -ldl

check: all test-deps $(UNIT_BIN) $(SHIM_BIN)
	@python3 tests/run.py --build $(B)

$(B)/floor/%: tests/floor/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -pthread -o $@ $< $(LIBS_SSL)

bench: all test-deps $(FLOOR_BIN)
	@python3 tests/bench.py --build $(B)

run: all
	@sh tools/run-demo.sh $(B)

# fuzz: each harness in tests/fuzz under libFuzzer (clang) for FUZZ_SECONDS;
# FUZZ=name runs tests/fuzz/fuzz_name.c alone.
FUZZ_SECONDS ?= 60
FUZZ_SRC := $(if $(FUZZ),tests/fuzz/fuzz_$(FUZZ).c,$(wildcard tests/fuzz/fuzz_*.c))
.PHONY: fuzz
fuzz:
	@command -v clang >/dev/null || sh tools/deps.sh fuzz
	@mkdir -p build-fuzz
	@for f in $(FUZZ_SRC); do \
	    n=$$(basename $$f .c); \
	    clang $(STD) -g -O1 -fsanitize=fuzzer,address,undefined $(DEFS) \
	        -o build-fuzz/$$n $$f $(COMMON_SRC) $(LIBS_SASL) $(LIBS_SSL) $(LIBS_IDN) \
	        || exit 1; \
	    mkdir -p build-fuzz/$$n.corpus; \
	    build-fuzz/$$n -max_total_time=$(FUZZ_SECONDS) build-fuzz/$$n.corpus \
	        tests/fuzz/corpus/$$n || exit 1; \
	done

# install: programs, man pages, example configurations (never over a real
# one), systemd units and a cron example.  The units and the cron example
# name /usr/sbin, /usr/bin and /etc/odmr; the installed copies get this
# installation's directories, so they agree with the programs' defaults.
SYSTEMDDIR ?= $(PREFIX)/lib/systemd/system
EXAMPLEDIR ?= $(DOCDIR)/examples
MAN1_PAGES := man/odmr-fetch.1
MAN5_PAGES := man/odmrd.conf.5
MAN8_PAGES := man/odmrd.8 man/odmrctl.8
UNITS      := odmrd.service odmr-fetch.service odmr-fetch.timer \
              odmr-fetch-push.service
EXAMPLES   := contrib/odmrd.conf.example contrib/odmr-fetch.conf.example \
              contrib/fetchmail/fetchmailrc.example
SUBST_PATHS = sed -e 's|/usr/sbin/odmr|$(SBINDIR)/odmr|g' \
                  -e 's|/usr/bin/odmr-fetch|$(BINDIR)/odmr-fetch|g' \
                  -e 's|/etc/odmr/|$(SYSCONFDIR)/odmr/|g'
# The pages name the /usr paths too (with roff's "\-"); installed copies
# get this installation's, as the units do.
SUBST_MAN = $(SUBST_PATHS) -e 's|/usr/bin/odmr\\-fetch|$(BINDIR)/odmr\\-fetch|g' \
                           -e 's|/usr/share/doc/odmr/|$(DOCDIR)/|g'

install: all
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) \
	    $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 \
	    $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(EXAMPLEDIR) $(DESTDIR)$(SYSTEMDDIR)
	install -m 755 $(B)/odmrd $(B)/odmrctl $(DESTDIR)$(SBINDIR)/
	install -m 755 $(B)/odmr-fetch $(DESTDIR)$(BINDIR)/
	for p in $(MAN1_PAGES) $(MAN5_PAGES) $(MAN8_PAGES); do \
	    d=$(DESTDIR)$(MANDIR)/man$${p##*.}/$${p##*/} && \
	    $(SUBST_MAN) $$p > $$d && chmod 644 $$d || exit 1; \
	done
	install -m 644 $(EXAMPLES) $(DESTDIR)$(EXAMPLEDIR)/
	$(SUBST_PATHS) contrib/cron/odmr-fetch > $(DESTDIR)$(EXAMPLEDIR)/odmr-fetch.cron
	chmod 644 $(DESTDIR)$(EXAMPLEDIR)/odmr-fetch.cron
	for u in $(UNITS); do \
	    $(SUBST_PATHS) contrib/systemd/$$u > $(DESTDIR)$(SYSTEMDDIR)/$$u && \
	    chmod 644 $(DESTDIR)$(SYSTEMDDIR)/$$u || exit 1; \
	done

.PHONY: uninstall
uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/odmrd $(DESTDIR)$(SBINDIR)/odmrctl \
	    $(DESTDIR)$(BINDIR)/odmr-fetch
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(MAN1_PAGES))) \
	    $(addprefix $(DESTDIR)$(MANDIR)/man5/,$(notdir $(MAN5_PAGES))) \
	    $(addprefix $(DESTDIR)$(MANDIR)/man8/,$(notdir $(MAN8_PAGES)))
	rm -f $(addprefix $(DESTDIR)$(EXAMPLEDIR)/,$(notdir $(EXAMPLES)) odmr-fetch.cron)
	rm -f $(addprefix $(DESTDIR)$(SYSTEMDDIR)/,$(UNITS))
	rmdir $(DESTDIR)$(EXAMPLEDIR) $(DESTDIR)$(DOCDIR) 2>/dev/null || true

# deb: dpkg-buildpackage -us -uc -b on a copy of the tree (it writes
# ../*.deb, and "debian/rules clean" would remove build/), then lintian.
# The packages, .changes and .buildinfo end up in DEB_DIR.
DEB_DIR ?= $(B)/deb
deb:
	@command -v dpkg-buildpackage >/dev/null && command -v lintian >/dev/null \
	    && command -v dh >/dev/null || sh tools/deps.sh test
	@set -e; tmp=$$(mktemp -d /tmp/odmr-deb.XXXXXX); \
	trap 'rm -rf "$$tmp"' EXIT; mkdir "$$tmp/odmr"; \
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	    git ls-files -co --exclude-standard -z | \
	        tar --null -T - --ignore-failed-read -cf - 2>/dev/null; \
	else tar --exclude='./build*' --exclude=./.git -cf - .; fi | \
	    tar -C "$$tmp/odmr" -xf -; \
	(cd "$$tmp/odmr" && DEB_BUILD_OPTIONS="parallel=$$(nproc) $$DEB_BUILD_OPTIONS" \
	    dpkg-buildpackage -us -uc -b) > "$$tmp/build.log" 2>&1 || \
	    { tail -n 60 "$$tmp/build.log"; exit 1; }; \
	mkdir -p $(DEB_DIR); rm -f $(DEB_DIR)/*.deb $(DEB_DIR)/*.changes $(DEB_DIR)/*.buildinfo; \
	cp "$$tmp"/*.deb "$$tmp"/*.changes "$$tmp"/*.buildinfo $(DEB_DIR)/; \
	echo "deb: $$(cd $(DEB_DIR) && ls *.deb | tr '\n' ' ')in $(DEB_DIR)"; \
	TMPDIR="$$tmp" lintian --fail-on error $(DEB_DIR)/*.changes

clean:
	rm -rf build build-san

-include $(shell find $(B) -name '*.d' 2>/dev/null)
