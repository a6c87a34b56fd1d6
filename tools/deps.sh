#!/bin/sh
# Installs the Debian packages odmr needs when they are missing.
#   tools/deps.sh build   - compilers' libraries (OpenSSL, Cyrus SASL, GDBM, libidn2)
#   tools/deps.sh run     - plus what "make run" uses (openssl, swaks)
#   tools/deps.sh test    - plus the real mail software the tests talk to,
#                           and the Debian packaging tools (make deb)
#   tools/deps.sh fuzz    - clang and its libFuzzer runtime (make fuzz)
# Postfix is installed without configuring or starting the system instance:
# tests and benchmarks run private instances of their own.  fail2ban is
# installed for its fail2ban-regex only; its service is not started.
set -eu
what=${1:-build}

need=""
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }
for p in libssl-dev libsasl2-dev libsasl2-modules libgdbm-dev libidn2-dev make gcc; do
    have_pkg "$p" || need="$need $p"
done
if [ "$what" = run ]; then
    for p in openssl swaks; do
        have_pkg "$p" || need="$need $p"
    done
fi
if [ "$what" = fuzz ]; then
    for p in clang libclang-rt-14-dev; do
        have_pkg "$p" || need="$need $p"
    done
fi
if [ "$what" = test ]; then
    # dpkg-dev .. adduser: "make deb" and test_package (systemd only for
    # systemd-analyze; its service manager is not started).
    # rspamd, opendkim, opendkim-tools: the milters test_milter runs
    # privately on loopback (their system services are never started).
    for p in swaks fetchmail postfix sasl2-bin python3 openssl groff-base fail2ban \
             dpkg-dev debhelper lintian devscripts ssl-cert adduser systemd \
             rspamd opendkim opendkim-tools; do
        have_pkg "$p" || need="$need $p"
    done
fi
[ -z "$need" ] && exit 0

echo "deps: installing$need" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "deps: missing packages:$need (run as root or install them)" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
case "$need" in
*postfix*)
    echo "postfix postfix/main_mailer_type select No configuration" |
        $SUDO debconf-set-selections
    ;;
esac
case "$need" in
*postfix*|*fail2ban*|*rspamd*|*opendkim*)
    # Keep the packages' maintainer scripts from starting the system
    # instances: our tests start private Postfix, rspamd and opendkim
    # instances, and only run fail2ban-regex -- a fail2ban-server would
    # ban the tests' 127.0.0.x clients, a system rspamd would query
    # DNS servers on the network.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        remove_policy=1
    fi
    ;;
esac
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq $need >&2
[ "${remove_policy:-0}" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
exit 0
