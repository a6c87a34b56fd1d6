"""The Debian packages (make deb, debian/) and the home-server guide
(docs/home-server.md, contrib/home-server/).

  1. test_package_build: "make deb" builds odmrd and odmr-fetch from a
     copy of the tree (nothing written into it or next to it), lintian
     reports no errors and no warning that docs/packaging.md does not list.
  2. test_package_install_run_purge: apt-get installs both packages and
     the machine is checked (users, directories, modes, conffiles, unit
     enablement); the installed odmrd runs the guide's VPS configuration
     as odmrd.service would start it, with the certificate the guide's
     certbot hook installs; a message sent with swaks is fetched by the
     installed odmr-fetch, as the user odmr-fetch.service runs as, with
     the guide's odmr-fetch.conf, into a Maildir, byte-exact.  Then
     apt-get purge removes both and exactly what docs/packaging.md says
     stays is left.  The purge runs in a finally block, and the machine's
     users, groups and systemd links are compared with what they were.
  3. test_home_server_guide_snippets: every file of contrib/home-server
     is shown verbatim in the guide, and the snippets agree with each
     other (DNS, odmrd.conf, odmr-fetch.conf); the timer drop-in and the
     Postfix lines are checked by systemd-analyze and postconf.

Needs root, dpkg-buildpackage, lintian, apt-get, swaks and openssl; a
missing one is a failure, never a skip.  The packages must not be
installed already (the test would not leave the machine as it found it).
"""

import glob
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess

from harness import check, fail, need, received_header, strip_received, \
    wait_for
from test_interop import original, swaks_send, lf, check_exact

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
HOME = os.path.join(ROOT, "contrib", "home-server")
GUIDE = os.path.join(ROOT, "docs", "home-server.md")
PACKAGING = os.path.join(ROOT, "docs", "packaging.md")
PACKAGES = ("odmrd", "odmr-fetch")
USERS = ("odmr", "odmr-fetch")
DATA_DIRS = ("/var/spool/odmr", "/var/lib/odmr")
SNAKEOIL = ("/etc/ssl/certs/ssl-cert-snakeoil.pem",
            "/etc/ssl/private/ssl-cert-snakeoil.key")
SENDER = "sender@remote.test"


def deb_dir(env):
    """Shared by the build and the install test: under the build directory
    (ignored by git), so that it outlives one test's Env."""
    return os.path.join(env.build, "deb-test")


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def conf_keys(path):
    """{key: value} of a key = value file (odmrd.conf / odmr-fetch.conf)."""
    out = {}
    for line in read(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k, v = line.split("=", 1)
        check(k.strip() not in out, "%s sets %s twice" % (path, k.strip()))
        out[k.strip()] = v.strip()
    return out


def write_conf(path, keys, mode=0o644):
    with open(path, "w") as f:
        for k, v in keys.items():
            f.write("%s = %s\n" % (k, v))
    os.chmod(path, mode)


def kept_warnings():
    """The lintian tags docs/packaging.md lists as kept: `tag` in the
    table of its "lintian" section."""
    text = read(PACKAGING)
    sec = text.split("## lintian", 1)
    check(len(sec) == 2, "docs/packaging.md has no '## lintian' section")
    return set(re.findall(r"^\| `([a-z0-9.+-]+)` \|", sec[1].split("\n## ")[0],
                          re.M))


def build_products():
    """What dpkg-buildpackage and debhelper leave in a tree they built in."""
    d = os.path.join(ROOT, "debian")
    return sorted(n for n in os.listdir(d)
                  if n in ("tmp", "files", ".debhelper", "odmrd", "odmr-fetch",
                           "debhelper-build-stamp")
                  or n.endswith((".substvars", ".debhelper.log")))


# --------------------------------------------------------------------------
# 1. build + lintian

def test_package_build(env):
    need("dpkg-buildpackage")
    need("lintian")
    need("dh")
    out = deb_dir(env)
    shutil.rmtree(out, ignore_errors=True)
    version = re.search(r'ODMR_VERSION "([^"]+)"',
                        read(os.path.join(ROOT, "common", "util.h"))).group(1)
    first = read(os.path.join(ROOT, "debian", "changelog")).split("\n")[0]
    check(first.startswith("odmr (%s" % version),
          "debian/changelog's version is not ODMR_VERSION %s: %r"
          % (version, first))
    check(build_products() == [], "the tree's debian/ holds build "
          "products: %r" % build_products())
    programs = [os.path.join(ROOT, "build", p) for p in
                ("odmrd", "odmrctl", "odmr-fetch")]
    built = [p for p in programs if os.path.exists(p)]
    parent = set(os.listdir(os.path.dirname(ROOT)))
    r = env.run(["make", "-C", ROOT, "--no-print-directory", "deb",
                 "DEB_DIR=" + out], timeout=110)
    text = r.stdout + r.stderr
    if r.returncode != 0:
        fail("make deb exited %d:\n%s" % (r.returncode, text[-3000:]))
    for p in PACKAGES:
        debs = glob.glob(os.path.join(out, "%s_%s*.deb" % (p, version)))
        check(len(debs) == 1, "%s: %r in %s" % (p, debs, out))
    tags = re.findall(r"^([EWIPX]): (\S+)(?: \S+)?: (\S+)", text, re.M)
    errors = [t for t in tags if t[0] == "E"]
    check(not errors, "lintian errors: %r\n%s" % (errors, text[-2000:]))
    kept = kept_warnings()
    unlisted = sorted({t[2] for t in tags if t[0] == "W"} - kept)
    check(not unlisted, "lintian warnings not listed in docs/packaging.md: "
          "%r" % unlisted)
    check(build_products() == [], "make deb built in the tree: debian/%r"
          % build_products())
    check(all(os.path.exists(p) for p in built),
          "make deb removed the tree's build/ programs")
    # what dpkg-buildpackage would leave in ../ - other programs may use
    # that directory meanwhile (it is /tmp for a clone there)
    new = {n for n in set(os.listdir(os.path.dirname(ROOT))) - parent
           if re.search(r"\.(deb|changes|buildinfo|dsc)$", n)}
    check(not new, "make deb wrote next to the tree: %r" % sorted(new))
    env.info("lintian: %s" % (", ".join("%s %s" % (t[0], t[2]) for t in tags)
                              or "clean"))


# --------------------------------------------------------------------------
# 2. install, run, purge

def installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       universal_newlines=True)
    return r.returncode == 0 and "installed" in r.stdout \
        or "config-files" in r.stdout


def getpw(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def getgr(name):
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def machine_state():
    """What the packages may change and purge must restore."""
    state = {}
    for f in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"):
        try:
            state[f] = read(f)
        except OSError:
            state[f] = None
    links = []
    for top in ("/etc/systemd/system", "/var/lib/systemd/deb-systemd-helper-enabled"):
        for d, dirs, files in os.walk(top):
            links.extend(os.path.join(d, x) for x in sorted(dirs + files))
    state["systemd"] = sorted(links)
    state["/etc/ssl/certs"] = sorted(os.listdir("/etc/ssl/certs"))
    state["paths"] = {p: os.path.lexists(p) for p in
                      ("/etc/odmr",) + DATA_DIRS + SNAKEOIL}
    return state


def odmrd_processes():
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                exe = os.readlink("/proc/%s/exe" % pid)
            except OSError:
                continue
            if exe in ("/usr/sbin/odmrd", "/usr/bin/odmr-fetch"):
                out.append(int(pid))
    return out


def apt(env, *args, timeout=100):
    e = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return env.run(["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0"]
                   + list(args), env=e, timeout=timeout)


def check_installed(env):
    """Users, directories, modes, conffiles and unit links after install."""
    odmr = getpw("odmr")
    check(odmr is not None and getgr("odmr") is not None,
          "no user/group odmr after install")
    check(odmr.pw_uid < 1000 and odmr.pw_gid == getgr("odmr").gr_gid,
          "odmr is not a system user with its own group: %r" % (odmr,))
    check(odmr.pw_shell in ("/usr/sbin/nologin", "/bin/false"),
          "odmr's shell %r" % odmr.pw_shell)
    check("odmr" in getgr("ssl-cert").gr_mem, "odmr is not in ssl-cert")
    check(getpw("odmr-fetch") is not None and getgr("odmr-fetch") is not None,
          "no user/group odmr-fetch (odmr-fetch.service's User=)")
    for d in DATA_DIRS:
        st = os.lstat(d)
        check(stat.S_ISDIR(st.st_mode) and st.st_uid == odmr.pw_uid
              and st.st_gid == odmr.pw_gid
              and stat.S_IMODE(st.st_mode) == 0o700,
              "%s: mode %o owner %d:%d" % (d, st.st_mode, st.st_uid,
                                           st.st_gid))
    r = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "odmrd"],
                       stdout=subprocess.PIPE, universal_newlines=True)
    check(r.stdout.split()[:1] == ["/etc/odmr/odmrd.conf"],
          "odmrd's conffiles: %r" % r.stdout)
    check(read("/etc/odmr/odmrd.conf") ==
          read(os.path.join(ROOT, "debian", "conf", "odmrd.conf")),
          "/etc/odmr/odmrd.conf is not debian/conf/odmrd.conf")
    conf = conf_keys("/etc/odmr/odmrd.conf")
    check(conf.get("user") == "odmr"
          and conf.get("spool_dir") == "/var/spool/odmr"
          and conf.get("accounts_db") == "/var/lib/odmr/accounts.db"
          and conf.get("tls_cert_file") == SNAKEOIL[0]
          and conf.get("tls_key_file") == SNAKEOIL[1],
          "installed odmrd.conf: %r" % conf)
    r = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "odmr-fetch"],
                       stdout=subprocess.PIPE, universal_newlines=True)
    check(r.stdout.strip() == "", "odmr-fetch has conffiles %r" % r.stdout)
    for f in SNAKEOIL:
        check(os.path.exists(f), "%s missing after install" % f)
    for f in ("/usr/sbin/odmrd", "/usr/sbin/odmrctl", "/usr/bin/odmr-fetch",
              "/usr/share/man/man8/odmrd.8.gz", "/usr/share/man/man8/odmrctl.8.gz",
              "/usr/share/man/man5/odmrd.conf.5.gz",
              "/usr/share/man/man1/odmr-fetch.1.gz",
              "/lib/systemd/system/odmrd.service",
              "/lib/systemd/system/odmr-fetch.service",
              "/lib/systemd/system/odmr-fetch.timer",
              "/lib/systemd/system/odmr-fetch-push.service"):
        check(os.path.exists(f), "%s not installed" % f)
    wants = "/etc/systemd/system/multi-user.target.wants/odmrd.service"
    check(os.path.islink(wants), "odmrd.service is not enabled (%s)" % wants)
    for unit in ("timers.target.wants/odmr-fetch.timer",
                 "multi-user.target.wants/odmr-fetch.service",
                 "multi-user.target.wants/odmr-fetch-push.service"):
        check(not os.path.lexists("/etc/systemd/system/" + unit),
              "%s is enabled: it must stay off until configured" % unit)


def unit_line(path, key):
    lines = [l.split("=", 1)[1] for l in read(path).splitlines()
             if l.startswith(key + "=")]
    check(len(lines) == 1, "%s: %s= lines %r" % (path, key, lines))
    return lines[0]


def make_lineage(env):
    """What certbot leaves in /etc/letsencrypt/live/NAME: a certificate
    (self-signed here, for the name the test connects to) and its key."""
    openssl = need("openssl")
    live = env.path("letsencrypt-live")
    os.mkdir(live, 0o700)
    r = env.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                 "-keyout", os.path.join(live, "privkey.pem"),
                 "-out", os.path.join(live, "fullchain.pem"), "-days", "2",
                 "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost"], timeout=60)
    check(r.returncode == 0, "openssl: %s" % r.stderr)
    return live


def run_hook(env, live, tls_dir, reload_cmd):
    hook = os.path.join(HOME, "certbot-deploy-hook")
    r = env.run(["sh", hook], env=dict(os.environ, RENEWED_LINEAGE=live,
                                       ODMR_TLS_DIR=tls_dir,
                                       ODMR_RELOAD=reload_cmd))
    check(r.returncode == 0, "certbot-deploy-hook exited %d: %s"
          % (r.returncode, r.stderr))
    odmr_gid = getgr("odmr").gr_gid
    for name, mode in (("fullchain.pem", 0o644), ("privkey.pem", 0o640)):
        st = os.stat(os.path.join(tls_dir, name))
        check(stat.S_IMODE(st.st_mode) == mode and st.st_gid == odmr_gid,
              "hook's %s: mode %o gid %d" % (name, st.st_mode, st.st_gid))
        check(read(os.path.join(tls_dir, name), "rb")
              == read(os.path.join(live, name), "rb"), "hook's %s differs"
              % name)


def vps_and_home(env):
    """The guide on one machine: the installed odmrd with the VPS's
    configuration, the installed odmr-fetch with the home server's."""
    # odmrd -t on the installed configuration, as ExecStartPre runs it
    # (and once without -c: the compiled-in default must be /etc/odmr).
    unit = "/lib/systemd/system/odmrd.service"
    pre = unit_line(unit, "ExecStartPre").split()
    start = unit_line(unit, "ExecStart").split()
    check(pre == ["/usr/sbin/odmrd", "-t", "-c", "/etc/odmr/odmrd.conf"]
          and start == ["/usr/sbin/odmrd", "-f", "-c", "/etc/odmr/odmrd.conf"],
          "odmrd.service starts %r / %r" % (pre, start))
    for argv in (pre, ["/usr/sbin/odmrd", "-t"]):
        r = env.run(argv)
        check(r.returncode == 0, "%s exited %d:\n%s%s" % (
            " ".join(argv), r.returncode, r.stdout, r.stderr))

    # The test's directory must be searchable by odmr and odmr-fetch.
    os.chmod(env.dir, 0o711)
    live = make_lineage(env)
    tls_dir = env.path("tls")
    run_hook(env, live, tls_dir, "true")

    # The VPS: the guide's odmrd.conf with loopback listeners and the
    # hook's copies in the test's directory; everything else as shown.
    vps = conf_keys(os.path.join(HOME, "odmrd.conf"))
    check(vps["require_tls"] == "yes", "the guide's odmrd.conf: %r" % vps)
    vps.update(odmr_listen="127.0.0.1:%d" % env.odmr_port,
               smtp_listen="127.0.0.1:%d" % env.smtp_port,
               tls_cert_file=os.path.join(tls_dir, "fullchain.pem"),
               tls_key_file=os.path.join(tls_dir, "privkey.pem"))
    env.conf = vps
    env.write_conf()
    env.spool = vps["spool_dir"]
    env.odmrd_bin = start[0]
    env.odmrctl_bin = "/usr/sbin/odmrctl"
    r = env.run([env.odmrd_bin, "-t", "-c", env.conf_path])
    check(r.returncode == 0, "odmrd -t on the guide's VPS configuration: "
          "%s%s" % (r.stdout, r.stderr))
    env.add_user("home", "home-secret")
    env.add_domain("example.org", "home")
    env.start()
    check(os.stat(vps["accounts_db"]).st_uid == getpw("odmr").pw_uid,
          "accounts.db does not belong to odmr")
    master = [p for p in odmrd_processes()]
    check(master, "no /usr/sbin/odmrd process")
    for pid in master:
        with open("/proc/%d/status" % pid) as f:
            uids = [l.split()[1:] for l in f if l.startswith("Uid:")][0]
        if pid != env.daemon.pid:
            check(set(uids) == {str(getpw("odmr").pw_uid)},
                  "odmrd session process %d runs as %r" % (pid, uids))

    # A renewal: the hook replaces the files and reloads odmrd.
    run_hook(env, live, tls_dir, "kill -HUP %d" % env.daemon.pid)
    wait_for(lambda: "configuration reloaded" in env.log(), 10,
             what="odmrd's reload after the hook")

    sent = original("package", to="me@example.org")
    swaks_send(env, env.smtp_port, ["me@example.org"], sent, sender=SENDER,
               name="package")
    ids = env.queued_ids("example.org")
    check(len(ids) == 1, "queued at the VPS: %r" % env.queued())
    stored = env.message("example.org", ids[0])
    check("by mx.example.org (odmrd)" in received_header(stored),
          "odmrd's Received: %r" % received_header(stored))
    check_exact(sent, strip_received(stored), "the VPS's queued copy")

    # The home server: the guide's odmr-fetch.conf, as odmr-fetch.service
    # runs it (User=odmr-fetch), delivering into a Maildir instead of
    # Postfix and trusting the test's certificate.
    fu = getpw("odmr-fetch")
    home = conf_keys(os.path.join(HOME, "odmr-fetch.conf"))
    check(home["server"].split(":")[0] == vps["hostname"]
          and home["tls"] == "require", "the guide's odmr-fetch.conf: %r"
          % home)
    site = env.path("home")            # the home server's files
    os.mkdir(site, 0o700)
    os.chown(site, fu.pw_uid, fu.pw_gid)
    pwfile = os.path.join(site, "odmr-fetch.password")
    box = os.path.join(site, "Maildir")
    os.mkdir(box, 0o700)
    ca = env.path("ca.pem")
    shutil.copy(os.path.join(live, "fullchain.pem"), ca)
    os.chmod(ca, 0o644)
    home.update(server="localhost:%d" % env.odmr_port, password_file=pwfile,
                ca_file=ca,
                deliver="maildir:" + box,
                lock_file=os.path.join(site, "odmr-fetch.lock"))
    fconf = os.path.join(site, "odmr-fetch.conf")
    write_conf(fconf, home, 0o600)
    with open(pwfile, "w") as f:
        f.write("home-secret\n")
    os.chmod(pwfile, 0o600)
    for p in (fconf, pwfile, box):
        os.chown(p, fu.pw_uid, fu.pw_gid)
    funit = "/lib/systemd/system/odmr-fetch.service"
    check(unit_line(funit, "User") == "odmr-fetch",
          "odmr-fetch.service runs as %r" % unit_line(funit, "User"))
    fetch = unit_line(funit, "ExecStart").split()
    check(fetch[:2] == ["/usr/bin/odmr-fetch", "-c"],
          "odmr-fetch.service runs %r" % fetch)
    r = env.run([need("setpriv"), "--reuid=odmr-fetch", "--regid=odmr-fetch",
                 "--init-groups", fetch[0], "-c", fconf, "-v"], timeout=60)
    check(r.returncode == 0, "installed odmr-fetch exited %d:\n%s\n%s" % (
        r.returncode, r.stderr[-1500:], env.log_tail(15)))
    new = os.path.join(box, "new")
    files = sorted(os.listdir(new)) if os.path.isdir(new) else []
    check(len(files) == 1, "Maildir: %r\n%s" % (files, r.stderr[-800:]))
    got = read(os.path.join(new, files[0]), "rb")
    want = (b"Return-Path: <" + SENDER.encode() + b">\n"
            b"Delivered-To: me@example.org\n" + lf(stored))
    check_exact(want, got, "the Maildir file")
    check(env.queued() == [], "left at the VPS: %r" % env.queued())
    check("authenticated as home" in env.log() and "over TLS" in env.log(),
          "odmrd did not log AUTH over TLS:\n%s" % env.log_tail(15))
    rc = env.stop()
    check(rc == 0, "odmrd exited %r on SIGTERM" % rc)


def test_package_install_run_purge(env):
    check(os.geteuid() == 0, "the package test needs root (apt-get)")
    need("apt-get")
    need("swaks")
    out = deb_dir(env)
    debs = [glob.glob(os.path.join(out, "%s_*.deb" % p)) for p in PACKAGES]
    check(all(len(d) == 1 for d in debs), "packages not built (%s: %r); "
          "test_package_build must run first" % (out, debs))
    # Refuse a machine the test could not restore.
    for p in PACKAGES:
        check(not installed(p), "package %s is installed on this machine; "
              "the test will not replace it" % p)
    for u in USERS:
        check(getpw(u) is None and getgr(u) is None,
              "user or group %s exists on this machine" % u)
    for p in ("/etc/odmr", "/usr/sbin/odmrd", "/usr/bin/odmr-fetch") + DATA_DIRS:
        check(not os.path.lexists(p), "%s exists on this machine" % p)
    check(odmrd_processes() == [], "an installed odmrd is running")
    before = machine_state()
    policy = "/usr/sbin/policy-rc.d"
    own_policy = not os.path.lexists(policy)
    problems = []
    try:
        if own_policy and os.path.isdir("/run/systemd/system"):
            # A machine running systemd would start odmrd on ports 25/366.
            with open(policy, "w") as f:
                f.write("#!/bin/sh\nexit 101\n")
            os.chmod(policy, 0o755)
        else:
            own_policy = False
        r = env.run(["sh", "-c", "cd '%s' && DEBIAN_FRONTEND=noninteractive "
                     "apt-get install -y -q -o Dpkg::Use-Pty=0 %s" % (
                         out, " ".join("./" + os.path.basename(d[0])
                                       for d in debs))], timeout=100)
        check(r.returncode == 0, "apt-get install exited %d:\n%s%s" % (
            r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
        check_installed(env)
        vps_and_home(env)
        # Reinstalling (what an upgrade runs) keeps the queue and database.
        marker = os.path.join("/var/spool/odmr", "kept-by-upgrade")
        with open(marker, "w") as f:
            f.write("x")
        r = env.run(["sh", "-c", "cd '%s' && DEBIAN_FRONTEND=noninteractive "
                     "apt-get install -y -q --reinstall -o Dpkg::Use-Pty=0 "
                     "./%s" % (out, os.path.basename(debs[0][0]))],
                    timeout=100)
        check(r.returncode == 0, "apt-get reinstall: %s%s" % (r.stdout[-1500:],
                                                              r.stderr[-1500:]))
        check(os.path.exists(marker) and
              os.path.exists("/var/lib/odmr/accounts.db"),
              "reinstalling odmrd lost the queue or the database")
        # remove keeps the data, the users and the configuration.
        r = apt(env, "remove", "odmrd")
        check(r.returncode == 0, "apt-get remove: %s" % r.stderr[-1500:])
        check(os.path.exists(marker) and getpw("odmr") is not None
              and os.path.exists("/etc/odmr/odmrd.conf"),
              "apt-get remove odmrd did not keep the data, the user and the "
              "configuration")
    finally:
        if env.running():
            env.stop()
        r = apt(env, "purge", *PACKAGES)
        if r.returncode != 0:
            problems.append("apt-get purge exited %d: %s" % (
                r.returncode, r.stderr[-1500:]))
        if own_policy:
            os.unlink(policy)
        # What purge must have removed; whatever it did not is removed
        # here, so that the machine is left as it was found.
        left = odmrd_processes()
        if left:
            problems.append("odmr processes left: %r" % left)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        for u in USERS:
            if getpw(u) or getgr(u):
                problems.append("user/group %s left after purge" % u)
                subprocess.run(["userdel", u], stderr=subprocess.DEVNULL)
                subprocess.run(["groupdel", u], stderr=subprocess.DEVNULL)
        for p in ("/etc/odmr",) + DATA_DIRS:
            if os.path.lexists(p):
                problems.append("%s left after purge" % p)
                shutil.rmtree(p, ignore_errors=True)
        for p in SNAKEOIL:
            # odmrd's postinst generated the snakeoil pair (ssl-cert's
            # files, which purge keeps); a machine without it gets none back.
            if not before["paths"][p] and os.path.lexists(p):
                os.unlink(p)
        for name in os.listdir("/etc/ssl/certs"):
            link = os.path.join("/etc/ssl/certs", name)
            if name not in before["/etc/ssl/certs"] and os.path.islink(link) \
                    and os.readlink(link) == os.path.basename(SNAKEOIL[0]):
                os.unlink(link)     # make-ssl-cert's hash link
        after = machine_state()
        for k in before:
            if before[k] != after[k]:
                problems.append("%s differs after purge" % k)
    check(not problems, "; ".join(problems))


# --------------------------------------------------------------------------
# 3. the guide's snippets

def code_blocks(text):
    return re.findall(r"^```[a-z]*\n(.*?)^```\n", text, re.M | re.S)


def test_home_server_guide_snippets(env):
    guide = read(GUIDE)
    blocks = code_blocks(guide)
    for d, _, files in os.walk(HOME):
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, ROOT)
            check(rel in guide, "docs/home-server.md does not name %s" % rel)
            check(read(path) in blocks,
                  "docs/home-server.md does not show %s verbatim in a code "
                  "block" % rel)
    readme = read(os.path.join(ROOT, "README.md"))
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    check(links[:1] == ["docs/home-server.md"],
          "README.md's first docs link is %r, not docs/home-server.md"
          % links[:1])

    # DNS, VPS and home server name the same host; the firewall opens the
    # listeners' ports.
    zone = read(os.path.join(HOME, "dns.zone"))
    mx = re.search(r"^example\.org\.\s+\d+\s+IN\s+MX\s+\d+\s+(\S+)\.$", zone,
                   re.M)
    check(mx, "dns.zone has no MX for example.org")
    vps = conf_keys(os.path.join(HOME, "odmrd.conf"))
    home = conf_keys(os.path.join(HOME, "odmr-fetch.conf"))
    check(vps["hostname"] == mx.group(1) == home["server"].split(":")[0],
          "MX %s, odmrd hostname %s, odmr-fetch server %s" % (
              mx.group(1), vps["hostname"], home["server"]))
    check(re.search(r"^%s\.\s+\d+\s+IN\s+A\s" % re.escape(mx.group(1)), zone,
                    re.M), "dns.zone has no address for %s" % mx.group(1))
    for key, port in (("smtp_listen", 25), ("odmr_listen", 366)):
        check(all(w.endswith(":%d" % port) for w in vps[key].split()),
              "%s = %s" % (key, vps[key]))
        check("ufw allow %d/tcp" % port in guide,
              "the guide does not open port %d" % port)

    # The timer drop-in: a minute, and a calendar systemd accepts.
    drop = read(os.path.join(HOME, "odmr-fetch.timer.d", "override.conf"))
    cals = re.findall(r"^OnCalendar=(.*)$", drop, re.M)
    check(cals[:1] == [""] and len(cals) == 2,
          "the drop-in must reset OnCalendar and set one: %r" % cals)
    r = env.run([need("systemd-analyze"), "calendar", "--iterations=2",
                 cals[1]])
    check(r.returncode == 0, "systemd-analyze calendar %s: %s" % (cals[1],
                                                                 r.stderr))
    nxt = re.findall(r"(?:Next elapse|Iter\. #2): .*?(\d\d):(\d\d):(\d\d)",
                     r.stdout)
    check(len(nxt) == 2, "systemd-analyze output: %r" % r.stdout)
    t = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in nxt]
    check((t[1] - t[0]) % 86400 == 60, "%s is not every minute: %r"
          % (cals[1], r.stdout))
    # Postfix's relay lines: known parameters (postconf warns otherwise).
    pf = env.path("postfix")
    os.mkdir(pf)
    shutil.copy(os.path.join(HOME, "postfix-relay.cf"),
                os.path.join(pf, "main.cf"))
    open(os.path.join(pf, "master.cf"), "w").close()
    r = env.run([need("postconf"), "-c", pf, "-n"])
    check(r.returncode == 0 and "warning" not in r.stderr,
          "postconf on postfix-relay.cf: %s%s" % (r.stdout, r.stderr))
    names = set(re.findall(r"^(\w+) =", read(os.path.join(HOME,
                                                          "postfix-relay.cf")),
                           re.M))
    shown = set(re.findall(r"^(\w+) =", r.stdout, re.M))
    check(names <= shown, "postconf -n shows %r of %r" % (shown, names))
    r = env.run([need("postconf"), "-c", pf, "-h", "relayhost"])
    check(r.stdout.strip() == "[smtp.provider.example]:587",
          "relayhost %r" % r.stdout)
    # The guide's odmr-fetch.conf is one odmr-fetch accepts (up to the
    # network): the built client reads it and fails only on the network
    # or the missing password file, never on the configuration.
    fconf = env.path("odmr-fetch.conf")
    home.update(server="127.0.0.1:1", password_file=env.path("pw"),
                lock_file=env.path("lock"))
    with open(env.path("pw"), "w") as f:
        f.write("x\n")
    os.chmod(env.path("pw"), 0o600)
    write_conf(fconf, home, 0o600)
    r = env.run([env.fetch_bin, "-c", fconf, "--timeout", "5"])
    check(r.returncode == 75, "odmr-fetch with the guide's configuration "
          "(provider unreachable) exited %d, expected 75: %s"
          % (r.returncode, r.stderr))
