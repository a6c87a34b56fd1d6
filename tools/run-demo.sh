#!/bin/sh
# make run: a demo provider on loopback, everything under a work directory.
#   ODMR_WORKDIR  where to put it (default ./work)
#   ODMR_SMTP_PORT / ODMR_ODMR_PORT / ODMR_LMTP_PORT  (10025 / 10366 / 10024)
# A port that is taken is named (with its variable) before anything is
# written or started, and the script exits 1.  Otherwise odmrd replaces
# this shell (exec, in the foreground): its pid is this script's pid.
set -eu
B=${1:-build}
top=$(pwd)
work=${ODMR_WORKDIR:-$top/work}
smtp_port=${ODMR_SMTP_PORT:-10025}
odmr_port=${ODMR_ODMR_PORT:-10366}
lmtp_port=${ODMR_LMTP_PORT:-10024}
sh tools/deps.sh run

# Every port must be free before anything is written or started: a port
# that is taken (amavisd-new listens on 10024 and 10025 by default) would
# otherwise show up as odmrd failing after the walk-through.
# bind_error PORT: nothing when 127.0.0.1:PORT can be bound the way odmrd
# binds it (SO_REUSEADDR), else the reason (perl is Essential on Debian).
bind_error() {
    perl -MIO::Socket::INET -e '
        IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $ARGV[0],
                              Proto => "tcp", ReuseAddr => 1, Listen => 1)
            or print "$!";' "$1"
}
# check_port WHAT VARIABLE EXAMPLE-PORT PORT: complains unless PORT is free
check_port() {
    case $4 in
    ''|*[!0-9]*|0*) why="$2=$4 is not a port number" ;;
    *) if [ "$4" -gt 65535 ]; then
           why="$2=$4 is not a port number"
       elif [ "${seen#* $4 }" != "$seen" ]; then
           why="port $4 is also given to another listener"
       else
           why=$(bind_error "$4")
           [ -z "$why" ] || why="127.0.0.1:$4 is not free ($why)"
       fi ;;
    esac
    seen="$seen$4 "
    if [ -n "$why" ]; then
        example=$3
        [ "$4" != "$example" ] || example=$(($3 + 1000))
        echo "make run: $1 listener: $why; move it with $2," \
             "e.g. $2=$example make run (see README.md)" >&2
        bad=1
    fi
}
bad=0 seen=" "
check_port SMTP ODMR_SMTP_PORT 12525 "$smtp_port"
check_port LMTP ODMR_LMTP_PORT 12424 "$lmtp_port"
check_port ODMR ODMR_ODMR_PORT 12366 "$odmr_port"
if [ "$bad" != 0 ]; then
    echo "make run: nothing started" >&2
    exit 1
fi

mkdir -p "$work/spool"
chmod 700 "$work" "$work/spool"
conf="$work/odmrd.conf"
if [ ! -f "$work/cert.pem" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
    chmod 600 "$work/key.pem"
fi
cat > "$conf" <<CONF
# Demo configuration written by "make run"; see odmrd.conf(5).
hostname = localhost
odmr_listen = 127.0.0.1:$odmr_port
smtp_listen = 127.0.0.1:$smtp_port
lmtp_listen = 127.0.0.1:$lmtp_port
spool_dir = $work/spool
accounts_db = $work/accounts.db
tls_cert_file = $work/cert.pem
tls_key_file = $work/key.pem
timeout = 120s
CONF
if ! "$B/odmrctl" -c "$conf" user list 2>/dev/null | grep -q '^demo\b'; then
    printf 'demo-password\n' | "$B/odmrctl" -c "$conf" user add demo
    "$B/odmrctl" -c "$conf" domain add demo.example demo
fi
printf 'demo-password\n' > "$work/demo.password"
chmod 600 "$work/demo.password"

cat <<EOT

odmrd demo provider (work directory: $work)
  inbound SMTP  127.0.0.1:$smtp_port   LMTP 127.0.0.1:$lmtp_port   ODMR 127.0.0.1:$odmr_port
  account "demo" (password in $work/demo.password) owns domain demo.example

Send a message in (another terminal):
  swaks --server 127.0.0.1:$smtp_port --from alice@example.org --to bob@demo.example
See it queued:
  $B/odmrctl -c $conf queue
Fetch it as the small site would:
  $B/odmr-fetch -s 127.0.0.1:$odmr_port -u demo --password-file $work/demo.password \\
      --tls require --ca-file $work/cert.pem --deliver maildir:$work/Maildir -v demo.example

Stop with Ctrl-C.
EOT
exec "$B/odmrd" -f -c "$conf"
