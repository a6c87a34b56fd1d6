"""postfix_instance.py - a private Postfix instance for tests and benchmarks.

    from postfix_instance import PostfixInstance

    pf = PostfixInstance(mode="hold")              # everything stays queued
    pf = PostfixInstance(mode="relay", relay_to="127.0.0.1:2525")
    pf = PostfixInstance(mode="relay", relay_to="lmtp:127.0.0.1:2424")
    pf = PostfixInstance(mode="maildir", domains=["site.test"])
    pf.start()
    ... talk SMTP to 127.0.0.1:pf.port ...
    pf.queued()            # messages in incoming/active/deferred/hold/maildrop
    pf.clear_queue()       # postsuper -d ALL
    pf.stop()              # postfix stop, then SIGKILL whatever is left
    pf.cleanup()           # stop + remove the directory (unless keep)

Everything lives in one temporary directory (mode 0755, owned by root):

    DIR/etc/main.cf, DIR/etc/master.cf      config_directory (postfix -c)
    DIR/queue/                              queue_directory
    DIR/data/                               data_directory
    DIR/maillog                             maillog_file (postlogd)
    DIR/maildir/                            virtual_mailbox_base (mode maildir)

The instance never listens on port 25 and never touches the system
instance: master.cf has exactly one inet service, smtpd on HOST:PORT
(127.0.0.1 and a free port unless given), plus the internal unix services;
chroot is off everywhere.  It must be started as root (Postfix's master
runs as root and its daemons drop to mail_owner = postfix).

Modes (the transport setup):
  "hold"     smtpd puts every accepted message on the hold queue (the
             HOLD action of check_client_access static:HOLD): cleanup has
             written and fsynced the queue file before smtpd says 250, and
             the queue manager never touches it.  Cheapest durable queueing.
  "defer"    every message is queued and every delivery attempt defers
             (defer_transports = smtp); it ends up in deferred/.
  "relay"    everything is relayed to relay_to: "HOST:PORT" (SMTP),
             "lmtp:HOST:PORT" or "lmtp:unix:/path" (LMTP).  Retries are
             fast (queue_run_delay/backoff of a few seconds).
  "maildir"  mail for `domains` is delivered by virtual(8) into Maildirs
             under DIR/maildir/DOMAIN/{LOCALPART|catchall}/ (see
             add_mailbox(), maildir_for(), maildir_messages()); any other
             recipient is refused at RCPT time (default_transport = error).
  "discard"  accepted and thrown away (default_transport = discard).

main_extra (dict) and master_extra (list of master.cf lines) add to or
override the generated configuration.

Python 3 standard library only.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# Program lookup, ports and /proc walking are the integration harness's;
# one copy keeps their subtleties (ports below the ephemeral range,
# zombies) in one place.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "integration"))
import harness  # noqa: E402
from harness import (_alive as proc_alive,  # noqa: E402
                     _proc_stat, descendants as proc_descendants,
                     find_program, free_port,
                     session_members as proc_session_members)

# internal services Postfix needs (master.cf of Postfix 3.x, chroot off)
_MASTER_INTERNAL = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixError(Exception):
    """The instance could not be set up, started or queried."""


def need_program(program):
    """Path of a Postfix program; raises PostfixError when it is missing
    (a missing peer is an error, never a skip)."""
    p = find_program(program)
    if not p:
        raise PostfixError("required program %r is not installed "
                           "(make test-deps installs postfix)" % program)
    return p


def _parse_target(target):
    """"HOST:PORT" / "smtp:HOST:PORT" / "lmtp:HOST:PORT" / "lmtp:unix:/p"
    -> a Postfix transport:nexthop value."""
    kind = "smtp"
    if target.startswith("lmtp:"):
        kind, target = "lmtp", target[5:]
    elif target.startswith("smtp:"):
        target = target[5:]
    if kind == "lmtp" and target.startswith("unix:"):
        return "lmtp:unix:" + target[5:]
    if target.startswith("["):            # [v6]:port or [host]:port
        host, port = target[1:].split("]:", 1)
    else:
        host, port = target.rsplit(":", 1)
    if kind == "lmtp":
        return "lmtp:inet:[%s]:%s" % (host, port)
    return "smtp:[%s]:%s" % (host, port)


# ---------------------------------------------------------------- /proc
def proc_ppid(pid):
    """Parent of a live (not zombie) pid, else None."""
    st = _proc_stat(pid)
    return None if st is None or st[3] == "Z" else st[0]


# ---------------------------------------------------------------- instance
class PostfixInstance:
    def __init__(self, mode="hold", port=None, host="127.0.0.1",
                 relay_to=None, domains=("example.org",), name="postfix",
                 base_dir=None, myhostname=None, main_extra=None,
                 master_extra=None, smtpd_args=(), keep=None):
        if mode not in ("hold", "defer", "relay", "maildir", "discard"):
            raise ValueError("unknown mode %r" % mode)
        if mode == "relay" and not relay_to:
            raise ValueError("mode relay needs relay_to")
        self.mode = mode
        self.host = host
        self.port = port or free_port()
        self.relay_to = relay_to
        self.domains = list(domains)
        # distinct per instance: two instances relaying to each other must
        # not look like a mail loop to Postfix's SMTP client
        self.myhostname = myhostname or "%s.test" % "".join(
            c if c.isalnum() or c == "-" else "-" for c in name)
        self.main_extra = dict(main_extra or {})
        self.master_extra = list(master_extra or [])
        self.smtpd_args = list(smtpd_args)
        self.keep = (os.environ.get("ODMR_KEEP") == "1") if keep is None else keep
        self.postfix = need_program("postfix")
        self.postconf_bin = need_program("postconf")
        self.postsuper_bin = need_program("postsuper")
        try:
            pw = pwd.getpwnam("postfix")
        except KeyError:
            raise PostfixError("there is no 'postfix' user (is the postfix "
                               "package installed?)")
        self.mail_uid, self.mail_gid = pw.pw_uid, pw.pw_gid
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance must be started "
                               "as root")
        if base_dir:
            os.makedirs(base_dir, exist_ok=True)
            self.dir = base_dir
        else:
            self.dir = tempfile.mkdtemp(prefix="odmr-%s-" % name,
                                        dir=harness.TMP_ROOT)
        # Postfix daemons (uid postfix) resolve paths below this directory
        os.chmod(self.dir, 0o755)
        self.config_dir = os.path.join(self.dir, "etc")
        self.queue_dir = os.path.join(self.dir, "queue")
        self.data_dir = os.path.join(self.dir, "data")
        self.maillog = os.path.join(self.dir, "maillog")
        self.maildir_base = os.path.join(self.dir, "maildir")
        self.master_pid = None
        self.started = False
        self.write_config()

    # ---------------------------------------------------------- config
    def main_cf(self):
        d = self.dir
        m = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.myhostname,
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mynetworks_style": "host",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "relay_domains": "",
            "relayhost": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "html_directory": "no",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": d,
            "delay_warning_time": "0",
            "message_size_limit": "0",
            "mailbox_size_limit": "0",
            "virtual_mailbox_limit": "0",
            "smtputf8_enable": "yes",
        }
        if self.mode == "hold":
            m["smtpd_client_restrictions"] = "check_client_access static:HOLD"
            # never used while held; released mail is thrown away
            m["default_transport"] = "discard:released from hold"
        elif self.mode == "defer":
            m["default_transport"] = "smtp"
            m["defer_transports"] = "smtp"
        elif self.mode == "discard":
            m["default_transport"] = "discard:test setup"
        elif self.mode == "relay":
            t = _parse_target(self.relay_to)
            m["default_transport"] = t
            m["relay_transport"] = t
            m["queue_run_delay"] = "2s"
            m["minimal_backoff_time"] = "2s"
            m["maximal_backoff_time"] = "5s"
            m["smtp_connect_timeout"] = "5s"
            m["lmtp_connect_timeout"] = "5s"
        elif self.mode == "maildir":
            m["virtual_mailbox_domains"] = " ".join(self.domains)
            m["virtual_mailbox_base"] = self.maildir_base
            # <base>/<domain>/<localpart>/  (trailing / = Maildir format)
            m["virtual_mailbox_maps"] = "texthash:%s" % os.path.join(
                self.config_dir, "vmailbox")
            m["virtual_uid_maps"] = "static:%d" % self.mail_uid
            m["virtual_gid_maps"] = "static:%d" % self.mail_gid
            m["virtual_minimum_uid"] = str(min(100, self.mail_uid))
            m["default_transport"] = "error:this instance only delivers locally"
        m.update(self.main_extra)
        return m

    def master_cf(self):
        args = " ".join(self.smtpd_args)
        lines = ["# generated by tests/postfix_instance.py",
                 "%s:%d inet n - n - - smtpd %s" % (self.host, self.port, args),
                 _MASTER_INTERNAL.rstrip("\n")]
        lines.extend(self.master_extra)
        return "\n".join(lines) + "\n"

    def write_config(self):
        os.makedirs(self.config_dir, exist_ok=True)
        # postfix(1) chdirs to queue_directory before anything else; the
        # subdirectories are made by post-install create-missing at start.
        os.makedirs(self.queue_dir, mode=0o755, exist_ok=True)
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.chown(self.data_dir, self.mail_uid, self.mail_gid)
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write("# generated by tests/postfix_instance.py\n")
            for k, v in self.main_cf().items():
                f.write("%s = %s\n" % (k, v))
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(self.master_cf())
        if self.mode == "maildir":
            self._write_vmailbox()
            os.makedirs(self.maildir_base, exist_ok=True)
            os.chown(self.maildir_base, self.mail_uid, self.mail_gid)
            os.chmod(self.maildir_base, 0o755)

    def _write_vmailbox(self, extra=()):
        """Any recipient in a maildir domain is accepted: the catch-all
        @domain entry maps to DOMAIN/catchall/; explicit addresses
        (extra or add_mailbox()) get DOMAIN/LOCALPART/."""
        self._mailboxes = getattr(self, "_mailboxes", set()) | set(extra)
        with open(os.path.join(self.config_dir, "vmailbox"), "w") as f:
            for addr in sorted(self._mailboxes):
                local, dom = addr.rsplit("@", 1)
                f.write("%s %s/%s/\n" % (addr, dom, local))
            for dom in self.domains:
                f.write("@%s %s/catchall/\n" % (dom, dom))

    def add_mailbox(self, address):
        """Mode maildir: address gets its own Maildir (maildir_for()).
        Call before start() or reload() afterwards."""
        self._write_vmailbox([address])

    def maildir_for(self, address):
        local, dom = address.rsplit("@", 1)
        if address in getattr(self, "_mailboxes", set()):
            return os.path.join(self.maildir_base, dom, local)
        return os.path.join(self.maildir_base, dom, "catchall")

    def maildir_messages(self, address=None, domain=None):
        """Paths of delivered messages (new/ and cur/) of one Maildir, or
        of all Maildirs under the base (optionally one domain)."""
        if address:
            roots = [self.maildir_for(address)]
        else:
            roots = [os.path.join(self.maildir_base, domain)] if domain \
                else [self.maildir_base]
        out = []
        for r in roots:
            for root, dirs, files in os.walk(r):
                if os.path.basename(root) in ("new", "cur"):
                    out.extend(os.path.join(root, f) for f in files)
        return sorted(out)

    # ---------------------------------------------------------- running
    def _env(self):
        env = dict(os.environ)
        env["MAIL_CONFIG"] = self.config_dir
        env.pop("MAIL_DEBUG", None)
        return env

    def _run(self, argv, timeout=60, check=True):
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=timeout, env=self._env())
        except subprocess.TimeoutExpired:
            raise PostfixError("%s timed out after %ss" % (" ".join(argv),
                                                            timeout))
        out = p.stdout.decode("utf-8", "replace")
        err = p.stderr.decode("utf-8", "replace")
        if check and p.returncode != 0:
            raise PostfixError("%s exited %d: %s%s\n%s" % (
                " ".join(argv), p.returncode, err.strip(), out.strip(),
                self.log_tail(20)))
        return p.returncode, out, err

    def postconf(self, *args):
        """postconf -c DIR ARGS...; returns stdout."""
        return self._run([self.postconf_bin, "-c", self.config_dir]
                         + list(args))[1]

    def check(self):
        """`postfix -c DIR check`; returns its warnings (list of lines).
        Lines that only concern the shared system files are left out."""
        rc, out, err = self._run([self.postfix, "-c", self.config_dir,
                                  "check"], check=False)
        lines = [l for l in (out + err).splitlines() if l.strip()]
        if rc != 0:
            raise PostfixError("postfix check failed (%d):\n%s\n%s" % (
                rc, "\n".join(lines), self.log_tail(10)))
        return lines

    def start(self, timeout=30):
        """postfix -c DIR start; waits until smtpd's port accepts."""
        if self.started:
            raise PostfixError("already started")
        warnings = self.check()
        self.check_warnings = warnings
        self.started = True       # from here on stop() has work to do
        self._run([self.postfix, "-c", self.config_dir, "start"],
                  timeout=timeout)
        deadline = time.time() + timeout
        while True:
            pid = self._read_master_pid()
            if pid and proc_alive(pid):
                self.master_pid = pid
                break
            if time.time() > deadline:
                raise PostfixError("postfix master did not write its pid "
                                   "file\n" + self.log_tail())
            time.sleep(0.05)
        while True:
            try:
                s = socket.create_connection((self.host, self.port), 1)
                s.close()
                break
            except OSError:
                if time.time() > deadline:
                    raise PostfixError("postfix smtpd on %s:%d not accepting"
                                       "\n%s" % (self.host, self.port,
                                                 self.log_tail()))
                time.sleep(0.05)
        return self

    def _read_master_pid(self):
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self):
        return self.master_pid is not None and proc_alive(self.master_pid)

    def reload(self):
        self._run([self.postfix, "-c", self.config_dir, "reload"])

    def flush(self):
        """postqueue -f: attempt delivery of all queued mail now."""
        self._run([need_program("postqueue"), "-c", self.config_dir, "-f"])

    def pids(self):
        """The master and every live descendant (the processes to kill)."""
        if not self.master_pid or not proc_alive(self.master_pid):
            return []
        return [self.master_pid] + proc_descendants(self.master_pid)

    def stop(self, timeout=15):
        """postfix stop; then SIGKILL to whatever of the instance is left
        (master, its process group/session, descendants)."""
        if not self.started:
            return
        self.started = False
        pid = self.master_pid or self._read_master_pid()
        if pid and proc_alive(pid):
            try:
                self._run([self.postfix, "-c", self.config_dir, "stop"],
                          timeout=timeout, check=False)
            except PostfixError:
                pass
            deadline = time.time() + timeout
            while proc_alive(pid) and time.time() < deadline:
                time.sleep(0.05)
        if pid:
            for _ in range(50):
                victims = set(proc_descendants(pid)) | \
                    set(proc_session_members(pid))
                if proc_alive(pid):
                    victims.add(pid)
                if not victims:
                    break
                for v in victims:
                    try:
                        os.kill(v, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                time.sleep(0.05)
        self.master_pid = None

    def cleanup(self):
        """stop() and remove the directory (kept with ODMR_KEEP=1)."""
        try:
            self.stop()
        finally:
            if self.keep:
                print("  ODMR_KEEP: left postfix instance in %s" % self.dir)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    # ---------------------------------------------------------- queue
    def queue_counts(self):
        """{queue name: number of queue files} by walking the queue
        directories (hashed subdirectories included)."""
        out = {}
        for q in QUEUE_NAMES:
            n = 0
            for root, dirs, files in os.walk(os.path.join(self.queue_dir, q)):
                n += len(files)
            out[q] = n
        return out

    def queued(self):
        """Messages in the queue (maildrop, incoming, active, deferred,
        hold)."""
        return sum(self.queue_counts().values())

    def wait_queued(self, n, timeout=30, queue=None):
        """Waits until exactly n messages are queued (in `queue` only, when
        given); returns the last count seen (== n on success)."""
        deadline = time.time() + timeout
        while True:
            c = self.queue_counts()
            got = c[queue] if queue else sum(c.values())
            if got == n or time.time() > deadline:
                return got
            time.sleep(0.1)

    def wait_empty(self, timeout=30):
        return self.wait_queued(0, timeout) == 0

    def clear_queue(self):
        """postsuper -c DIR -d ALL (every queue); also works when stopped."""
        self._run([self.postsuper_bin, "-c", self.config_dir, "-d", "ALL"])

    # ---------------------------------------------------------- logs
    def log(self):
        try:
            with open(self.maillog, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n=40):
        lines = self.log().splitlines()
        return "\n".join(lines[-n:]) if lines else "(no postfix log)"
