"""The operator-facing files: man pages (man/), example configurations,
systemd units and cron example (contrib/), and `make install`.

* every page is lint-clean for groff (`groff -ww -z -man` prints nothing)
  and written in man(7), not mdoc;
* every odmrd.conf key (SPEC 3.1, and every key server/conf.c accepts) has
  its entry in odmrd.conf(5), every odmr-fetch option and key (SPEC 4, and
  what client/fetch_conf.c accepts) in odmr-fetch(1), every odmrctl command
  (SPEC 3.3) in odmrctl(8), every exit status in the page of its program;
* the example configurations name every key and are valid when every
  setting in them is uncommented;
* `make install DESTDIR=...` puts programs, pages, examples and units where
  they belong, with the installation's paths in the units, and `make
  uninstall` takes them away again;
* `systemd-analyze verify` accepts the installed units (only when
  systemd-analyze exists: it is not a program odmr needs).
"""

import filecmp
import os
import re
import stat

from harness import check, fail, find_program, need

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
MAN = os.path.join(ROOT, "man")
CONTRIB = os.path.join(ROOT, "contrib")

PAGES = ("odmrd.8", "odmrctl.8", "odmr-fetch.1", "odmrd.conf.5")

# SPEC 3.1
SPEC_CONF_KEYS = (
    "hostname", "odmr_listen", "smtp_listen", "lmtp_listen", "spool_dir",
    "accounts_db", "tls_cert_file", "tls_key_file", "require_tls",
    "sasl_mechanisms", "max_message_size", "max_recipients", "domain_quota",
    "queue_lifetime", "bounce_relay", "max_connections",
    "max_connections_per_ip", "timeout", "user", "pid_file")

# SPEC 4: (options, configuration key)
SPEC_FETCH_OPTIONS = (
    (("-s", "--server"), "server"),
    (("-u", "--user"), "user"),
    (("--password-file",), "password_file"),
    (("--mech",), "mechanisms"),
    (("--tls",), "tls"),
    (("--ca-file",), "ca_file"),
    (("--deliver",), "deliver"),
    (("--domains",), "domains"),
    (("--timeout",), "timeout"),
    (("--lock",), "lock_file"),
    (("-v",), None),
    (("-c",), None),
    (("--help",), None),
    (("--version",), None),
)

# SPEC 3.3
SPEC_CTL_COMMANDS = (
    "user add", "user passwd", "user del", "user list", "domain add",
    "domain del", "domain list", "queue", "queue summary", "queue delete",
    "queue delete --domain", "queue bounce", "enqueue")

EXIT_CODES = {
    "odmrd.8": ("0", "64", "78"),
    "odmrctl.8": ("0", "64", "65", "67", "73", "75", "77", "78"),
    "odmr-fetch.1": ("0", "64", "69", "75", "76", "77", "78"),
}

SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "EXAMPLES",
            "SEE ALSO", "STANDARDS")


# --------------------------------------------------------------------------
# reading roff source

def _args(text):
    """Macro arguments: words, or "quoted strings" with their spaces."""
    out, cur, quoted, had = [], [], False, False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"' and quoted and text[i + 1:i + 2] == '"':
            cur.append('"')
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
            had = True
        elif ch in " \t" and not quoted:
            if cur or had:
                out.append("".join(cur))
            cur, had = [], False
        else:
            cur.append(ch)
        i += 1
    if cur or had:
        out.append("".join(cur))
    return out


_ESCAPES = (("\\-", "-"), ("\\(aq", "'"), ("\\(ti", "~"), ("\\(ha", "^"),
            ("\\(lq", '"'), ("\\(rq", '"'), ("\\~", " "), ("\\e", "\\"),
            ("\\%", ""), ("\\&", ""), ("\\|", ""), ("\\c", ""))


def plain(line):
    """The text a source line shows, without fonts and escapes."""
    m = re.match(r"^\.(B|I|SM|SB)\s+(.*)$", line)
    if m:
        line = " ".join(_args(m.group(2)))
    else:
        m = re.match(r"^\.(BR|RB|IR|RI|BI|IB)\s+(.*)$", line)
        if m:
            line = "".join(_args(m.group(2)))
    line = re.sub(r"\\f(\[[A-Z]*\]|\(..|.)", "", line)
    for esc, rep in _ESCAPES:
        line = line.replace(esc, rep)
    return line


def read_page(name):
    with open(os.path.join(MAN, name), encoding="utf-8") as f:
        return f.read()


def sections(src):
    """{SECTION NAME: [source lines]}"""
    out, cur = {}, None
    for line in src.splitlines():
        m = re.match(r'^\.SH\s+"?([^"]*)"?\s*$', line)
        if m:
            cur = m.group(1).strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(line)
    return out


def entries(lines):
    """[(tag, body)] of the .TP entries (a .TQ adds to the tag)."""
    out = []
    tag, body, state = None, [], None
    for line in lines:
        if line.startswith(".TP") or line.startswith(".TQ"):
            if line.startswith(".TP") and tag is not None:
                out.append((tag, " ".join(body)))
                tag, body = None, []
            state = "tag"
            continue
        if re.match(r"^\.(SS|PP|P|LP|SH|RE)\b", line):
            if tag is not None:
                out.append((tag, " ".join(body)))
            tag, body, state = None, [], None
            continue
        if line.startswith('.\\"'):
            continue
        if state == "tag":
            tag = plain(line) if tag is None else tag + " / " + plain(line)
            state = "body"
        elif state == "body":
            body.append(plain(line))
    if tag is not None:
        out.append((tag, " ".join(body)))
    return out


def has_word(text, word):
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])",
                     text) is not None


def code_keys(path, pattern):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        keys = set(re.findall(pattern, f.read()))
    check(keys, "%s: found no keys with %r (the code changed: update this "
          "test)" % (path, pattern))
    return keys


# --------------------------------------------------------------------------

def test_pages_lint_clean(env):
    groff = need("groff")
    with open(os.path.join(ROOT, "common", "util.h"), encoding="utf-8") as f:
        m = re.search(r'#define ODMR_VERSION "([^"]+)"', f.read())
    check(m, "common/util.h: no ODMR_VERSION")
    version = m.group(1)
    for name in PAGES:
        path = os.path.join(MAN, name)
        check(os.path.isfile(path), "man/%s is missing" % name)
        r = env.run([groff, "-ww", "-z", "-man", path], timeout=60)
        if r.returncode != 0 or r.stdout.strip() or r.stderr.strip():
            fail("groff -ww -z -man man/%s: exit %d\n%s%s" % (
                name, r.returncode, r.stdout, r.stderr))
        # Rendering must work too (no fatal font or macro problems).
        r = env.run([groff, "-ww", "-man", "-Tascii", path], timeout=60)
        text = re.sub(r".\x08", "", r.stdout)   # overstrike bold/underline
        check(r.returncode == 0 and "NAME" in text and not r.stderr,
              "groff -man -Tascii man/%s: exit %d %r" % (
                  name, r.returncode, r.stderr[:300]))
        src = read_page(name)
        lines = src.splitlines()
        th = [l for l in lines if l.startswith(".TH ")]
        check(len(th) == 1, "%s: expected one .TH line" % name)
        th_args = _args(th[0][4:])
        section = name.rsplit(".", 1)[1]
        check(th_args[1] == section,
              "%s: .TH says section %r" % (name, th_args[1]))
        check(len(th_args) > 3 and th_args[3] == "odmr " + version,
              "%s: .TH names %r, the programs are odmr %s"
              % (name, th_args[3:4], version))
        for mdoc in (".Dd", ".Dt", ".Sh", ".Nm", ".Op", ".Fl"):
            check(not any(l.startswith(mdoc + " ") or l == mdoc
                          for l in lines),
                  "%s: uses mdoc macro %s; the pages are man(7)" % (name, mdoc))
        secs = sections(src)
        for s in SECTIONS:
            check(s in secs, "%s: no %s section" % (name, s))
        if name in EXIT_CODES:
            check("EXIT STATUS" in secs, "%s: no EXIT STATUS section" % name)
        nofill = False
        for i, line in enumerate(lines, 1):
            where = "man/%s:%d" % (name, i)
            check(line == line.rstrip(), "%s: trailing white space" % where)
            if line in (".EX", ".nf"):
                nofill = True
            elif line in (".EE", ".fi"):
                nofill = False
            check(line.strip() != "" or nofill,
                  "%s: empty line outside an example (use .PP)" % where)
            if line.startswith('.\\"'):
                continue
            # option names: a '-' that starts a word must be \-
            m = re.search(r"(?:^|[\s\[(|\"])(-{1,2}[A-Za-z])", line)
            check(not m, "%s: unescaped hyphen in %r (write \\-)"
                  % (where, m.group(1) if m else ""))


def test_conf_page_documents_every_key(env):
    secs = sections(read_page("odmrd.conf.5"))
    check("KEYS" in secs, "odmrd.conf.5: no KEYS section")
    documented = {}
    for tag, body in entries(secs["KEYS"]):
        for key in tag.split(" / "):
            documented[key.strip()] = body
    in_code = (code_keys("server/conf.c", r'strcmp\(k, "([a-z_]+)"\)') |
               code_keys("server/conf.c", r'\{"([a-z_]+)", KEY_'))
    for key in sorted(set(SPEC_CONF_KEYS) | in_code):
        check(key in documented,
              "odmrd.conf(5) has no entry for the key %s" % key)
    for key in documented:
        check(key in in_code, "odmrd.conf(5) documents %r, which server/"
              "conf.c does not accept" % key)
    for key, body in documented.items():
        check("Default" in body, "odmrd.conf(5): %s does not say its default"
              % key)


def test_fetch_page_documents_every_option(env):
    secs = sections(read_page("odmr-fetch.1"))
    opts = entries(secs.get("OPTIONS", []))
    check(opts, "odmr-fetch.1: no OPTIONS entries")
    for names, key in SPEC_FETCH_OPTIONS:
        found = [body for tag, body in opts
                 if all(has_word(tag, n) for n in names)]
        check(found, "odmr-fetch(1) OPTIONS has no entry for %s"
              % ", ".join(names))
        if key:
            check(has_word(found[0], key),
                  "odmr-fetch(1): the entry for %s does not name its "
                  "configuration key %s" % (names[-1], key))
    tags = " ".join(tag for tag, _ in opts)
    longs = code_keys("client/fetch_conf.c",
                      r'\{"([a-z-]+)", (?:required|no)_argument')
    for opt in longs:
        check(has_word(tags, "--" + opt),
              "odmr-fetch(1) OPTIONS has no entry for --%s" % opt)
    conf = entries(secs.get("CONFIGURATION FILE", []))
    keys = {tag.split()[0] for tag, _ in conf}
    in_code = code_keys("client/fetch_conf.c", r'strcmp\(key, "([a-z_]+)"\)')
    spec_keys = {k for _, k in SPEC_FETCH_OPTIONS if k}
    for key in sorted(in_code | spec_keys):
        check(key in keys, "odmr-fetch(1) CONFIGURATION FILE has no entry "
              "for the key %s" % key)
    for key in keys:
        check(key in in_code, "odmr-fetch(1) documents the key %r, which "
              "client/fetch_conf.c does not accept" % key)
    text = " ".join(plain(l) for l in read_page("odmr-fetch.1").splitlines())
    check("ODMR_PASSWORD" in text, "odmr-fetch(1) does not mention "
          "ODMR_PASSWORD")


def test_odmrd_and_odmrctl_pages(env):
    secs = sections(read_page("odmrd.8"))
    tags = " ".join(t for t, _ in entries(secs.get("OPTIONS", [])))
    for opt in ("-c", "-f", "-d", "-t", "--help", "--version"):
        check(has_word(tags, opt), "odmrd(8) OPTIONS has no entry for %s" % opt)
    tags = " ".join(t for t, _ in entries(secs.get("SIGNALS", [])))
    for sig in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"):
        check(sig in tags, "odmrd(8) SIGNALS has no entry for %s" % sig)

    secs = sections(read_page("odmrctl.8"))
    tags = [re.sub(r"\s+", " ", t) for t, _ in
            entries(secs.get("COMMANDS", []))]
    for cmd in SPEC_CTL_COMMANDS:
        check(any(t == cmd or t.startswith(cmd + " ") for t in tags),
              "odmrctl(8) COMMANDS has no entry for %r (entries: %r)"
              % (cmd, tags))

    for page, codes in EXIT_CODES.items():
        secs = sections(read_page(page))
        tags = [t.strip() for t, _ in entries(secs.get("EXIT STATUS", []))]
        for code in codes:
            check(code in tags, "%s: EXIT STATUS has no entry for %s"
                  % (page, code))


def _uncommented(path, keys, drop=()):
    """The example with the first '#key = value' line of each known key
    uncommented (later ones are alternatives: a key set twice is an
    error) and the keys in drop left out; also returns the keys found."""
    out, found = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^#?([a-z_]+)\s*=(.*)$", line)
            if m and m.group(1) in drop:
                found.add(m.group(1))
                continue
            if m and line.startswith("#") and m.group(1) in keys \
                    and m.group(1) not in found:
                found.add(m.group(1))
                line = line[1:]
            elif m and not line.startswith("#"):
                found.add(m.group(1))
            out.append(line)
    return "".join(out), found


def test_example_configs(env):
    # odmrd.conf.example: every key, and every value valid
    keys = (code_keys("server/conf.c", r'strcmp\(k, "([a-z_]+)"\)') |
            code_keys("server/conf.c", r'\{"([a-z_]+)", KEY_'))
    example = os.path.join(CONTRIB, "odmrd.conf.example")
    r = env.run([env.odmrd_bin, "-t", "-c", example], timeout=30)
    check(r.returncode == 0, "odmrd -t on the example as shipped: exit %d %s"
          % (r.returncode, r.stderr.strip()))
    text, found = _uncommented(example, keys)
    check(found == keys, "contrib/odmrd.conf.example lacks %s"
          % ", ".join(sorted(keys - found)))
    path = os.path.join(env.dir, "example-odmrd.conf")
    with open(path, "w") as f:
        f.write(text)
    r = env.run([env.odmrd_bin, "-t", "-c", path], timeout=30)
    check(r.returncode == 0 and "configuration ok" in r.stdout,
          "odmrd -t with every setting of the example uncommented: exit %d %s"
          % (r.returncode, r.stderr.strip()))

    # odmr-fetch.conf.example: every key; uncommented, the run gets as far
    # as connecting (to a closed port: 75), so the file parsed.
    keys = code_keys("client/fetch_conf.c", r'strcmp\(key, "([a-z_]+)"\)')
    example = os.path.join(CONTRIB, "odmr-fetch.conf.example")
    text, found = _uncommented(example, keys, drop=(
        "server", "ca_file", "password_file", "lock_file", "timeout"))
    check(found == keys, "contrib/odmr-fetch.conf.example lacks %s"
          % ", ".join(sorted(keys - found)))
    ca = os.path.join(env.dir, "ca.pem")
    pwfile = os.path.join(env.dir, "password")
    for p in (ca, pwfile):
        with open(p, "w") as f:
            f.write("x\n")
        os.chmod(p, 0o600)
    port = env.ports["odmr"]   # nothing listens: odmrd is not started
    text += ("server = 127.0.0.1:%d\nca_file = %s\npassword_file = %s\n"
             "lock_file = %s\ntimeout = 10\n" % (
                 port, ca, pwfile, os.path.join(env.dir, "fetch.lock")))
    path = os.path.join(env.dir, "example-fetch.conf")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    run_env = {k: v for k, v in os.environ.items() if k != "ODMR_PASSWORD"}
    r = env.run([env.fetch_bin, "-c", path], timeout=60, env=run_env)
    check(r.returncode == 75, "odmr-fetch -c <uncommented example> to a "
          "closed port: exit %d, expected 75; %s" % (
              r.returncode, r.stderr.strip()[:300]))


def _make(env, target, destdir):
    """make -C ROOT TARGET with the test's build directory.  `-o all`: the
    programs are already built (by `make check`); nothing is rebuilt and no
    package installer runs."""
    make = need("make")
    menv = {k: v for k, v in os.environ.items()
            if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES",
                         "DESTDIR", "PREFIX")}
    r = env.run([make, "-s", "-C", ROOT, "-o", "all", target,
                 "B=" + env.build, "PREFIX=/usr", "SYSCONFDIR=/etc",
                 "DESTDIR=" + destdir], timeout=120, env=menv)
    check(r.returncode == 0, "make %s: exit %d\n%s%s" % (
        target, r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
    return r


INSTALLED = {
    "usr/sbin/odmrd": 0o755,
    "usr/sbin/odmrctl": 0o755,
    "usr/bin/odmr-fetch": 0o755,
    "usr/share/man/man1/odmr-fetch.1": 0o644,
    "usr/share/man/man5/odmrd.conf.5": 0o644,
    "usr/share/man/man8/odmrd.8": 0o644,
    "usr/share/man/man8/odmrctl.8": 0o644,
    "usr/share/doc/odmr/examples/odmrd.conf.example": 0o644,
    "usr/share/doc/odmr/examples/odmr-fetch.conf.example": 0o644,
    "usr/share/doc/odmr/examples/fetchmailrc.example": 0o644,
    "usr/share/doc/odmr/examples/odmr-fetch.cron": 0o644,
    "usr/lib/systemd/system/odmrd.service": 0o644,
    "usr/lib/systemd/system/odmr-fetch.service": 0o644,
    "usr/lib/systemd/system/odmr-fetch.timer": 0o644,
    "usr/lib/systemd/system/odmr-fetch-push.service": 0o644,
}

UNITS = ("odmrd.service", "odmr-fetch.service", "odmr-fetch.timer",
         "odmr-fetch-push.service")


def _files(root):
    out = set()
    for d, _, fs in os.walk(root):
        for f in fs:
            out.add(os.path.relpath(os.path.join(d, f), root))
    return out


def test_make_install(env):
    dest = os.path.join(env.dir, "destdir")
    _make(env, "install", dest)
    got = _files(dest)
    for rel, mode in INSTALLED.items():
        path = os.path.join(dest, rel)
        check(rel in got, "make install did not install %s (got %s)"
              % (rel, sorted(got)))
        m = stat.S_IMODE(os.stat(path).st_mode)
        check(m == mode, "%s: mode %o, expected %o" % (rel, m, mode))
    check(got == set(INSTALLED), "make install installed unexpected files: %s"
          % sorted(got - set(INSTALLED)))
    for prog in ("odmrd", "odmrctl"):
        check(filecmp.cmp(os.path.join(env.build, prog),
                          os.path.join(dest, "usr/sbin", prog), shallow=False),
              "installed %s differs from the build's" % prog)
    for page in PAGES:
        sec = page.rsplit(".", 1)[1]
        check(filecmp.cmp(os.path.join(MAN, page), os.path.join(
            dest, "usr/share/man/man" + sec, page), shallow=False),
            "installed %s differs from man/%s" % (page, page))

    # The installed units and cron line name this installation's paths.
    unitdir = os.path.join(dest, "usr/lib/systemd/system")
    with open(os.path.join(unitdir, "odmrd.service")) as f:
        odmrd_unit = f.read()
    check(re.search(r"^ExecStart=/usr/sbin/odmrd -f -c /etc/odmr/odmrd.conf$",
                    odmrd_unit, re.M),
          "odmrd.service: unexpected ExecStart:\n%s" % odmrd_unit)
    check(re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", odmrd_unit,
                    re.M), "odmrd.service: no ExecReload sending SIGHUP")
    with open(os.path.join(unitdir, "odmr-fetch.service")) as f:
        fetch_unit = f.read()
    check(re.search(r"^ExecStart=/usr/bin/odmr-fetch -c "
                    r"/etc/odmr/odmr-fetch.conf$", fetch_unit, re.M),
          "odmr-fetch.service: unexpected ExecStart:\n%s" % fetch_unit)
    check(re.search(r"^SuccessExitStatus=75$", fetch_unit, re.M),
          "odmr-fetch.service: exit 75 (try again later) must not fail it")
    with open(os.path.join(dest, "usr/share/doc/odmr/examples/"
                           "odmr-fetch.cron")) as f:
        cron = f.read()
    check(re.search(r"^\S+ \S+ \S+ \S+ \S+\s+\S+\s+/usr/bin/odmr-fetch -c "
                    r"/etc/odmr/odmr-fetch.conf$", cron, re.M),
          "odmr-fetch.cron: no crontab line running odmr-fetch:\n%s" % cron)

    _verify_units(env, dest, unitdir)

    _make(env, "uninstall", dest)
    left = _files(dest)
    check(not left, "make uninstall left %s" % sorted(left))


def _verify_units(env, dest, unitdir):
    analyze = find_program("systemd-analyze")
    if not analyze:
        env.info("systemd-analyze not installed: units not verified")
        return
    # verify wants the programs of Exec*= to exist: point them into DESTDIR,
    # and let it find the Documentation=man: pages there.
    vdir = os.path.join(env.dir, "units")
    os.makedirs(vdir)
    for u in UNITS:
        with open(os.path.join(unitdir, u)) as f:
            text = f.read()
        text = text.replace("/usr/sbin/odmr", dest + "/usr/sbin/odmr")
        text = text.replace("/usr/bin/odmr-fetch", dest + "/usr/bin/odmr-fetch")
        with open(os.path.join(vdir, u), "w") as f:
            f.write(text)
    venv = dict(os.environ)
    venv["MANPATH"] = os.path.join(dest, "usr/share/man")
    venv["SYSTEMD_LOG_COLOR"] = "0"
    argv = [analyze, "verify"]
    if not find_program("man"):
        argv.append("--man=no")
        env.info("man not installed: Documentation= links not checked")
    argv += [os.path.join(vdir, u) for u in UNITS]
    r = env.run(argv, timeout=60, env=venv)
    if r.returncode != 0 or r.stderr.strip():
        fail("systemd-analyze verify: exit %d\n%s%s" % (
            r.returncode, r.stdout, r.stderr))
