/* fetch_conf.c - odmr-fetch's settings: command line, configuration file
 * (-c, the shared "key = value" format) and the password.
 *
 * Precedence: command line over configuration file over defaults.  The
 * password comes from --password-file, else ODMR_PASSWORD, else the
 * file's `password` or `password_file`; it is never taken from the
 * command line itself, where any user could read it in ps(1). */
#include "fetch.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/config.h"
#include "../common/sasl.h"

#define CLI_MAX 64                  /* options remembered for pass two */
#define ALL_MECHS "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN"

struct cli_opt {
    const char *key;
    const char *value;
};

struct loader {
    struct fetch_conf *c;
    const char *conf_path;          /* -c, or NULL */
    bool conf_password;             /* `password` came from the file */
    bool cli_password_file;         /* --password-file was given */
    bool cli_domains;               /* domains came from the command line */
    int problems;
};

static void usage(FILE *f)
{
    fprintf(f,
"usage: odmr-fetch [-c FILE] [options] [DOMAIN...]\n"
"Fetches a site's mail from an ODMR provider (RFC 2645) and hands it to\n"
"the site's mail system.\n\n"
"  -c FILE                configuration file (key = value)\n"
"  -s, --server HOST[:PORT]  provider (port 366 by default)\n"
"  -u, --user NAME        SASL identity\n"
"      --password-file FILE  first line is the password (mode 0600);\n"
"                         or set ODMR_PASSWORD in the environment\n"
"      --mech LIST        allowed SASL mechanisms (default: strongest)\n"
"      --tls MODE         require (default), auto or off\n"
"      --ca-file FILE     trust anchors (default: system store)\n"
"      --deliver TARGET   smtp:HOST:PORT (default smtp:127.0.0.1:25),\n"
"                         lmtp:HOST:PORT, lmtp:/socket, mda:COMMAND,\n"
"                         maildir:PATH (%%d domain, %%u local part)\n"
"      --domains A,B      domains to fetch (default: all of the account's)\n"
"      --timeout SEC      per network wait (default 300)\n"
"      --linger SEC       stay connected up to SEC and take mail as it\n"
"                         arrives (push delivery; default 0, off)\n"
"      --lock FILE        one run at a time (default: odmr-fetch.lock in\n"
"                         /run/odmr-fetch, $XDG_RUNTIME_DIR or (root) /run,\n"
"                         else ~/.odmr-fetch.lock or /tmp/odmr-fetch-UID.lock)\n"
"  -v, -vv, --verbose     summary line / protocol trace on stderr\n"
"  -h, --help, --version\n\n"
"Exit status: 0 done, 64 usage, 69 service refused, 75 try again later,\n"
"76 protocol error, 77 authentication or ATRN refused, 78 configuration.\n"
"See odmr-fetch(1).\n");
}

/* ---- values ---------------------------------------------------------- */

static bool clean_text(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 32 || *s == 127)
            return false;
    return true;
}

bool hostport_parse(const char *s, unsigned default_port, char *host,
                    size_t n, unsigned *port)
{
    const char *colon = NULL, *h = s;
    size_t hlen;

    if (s[0] == '[') {                     /* [v6] or [v6]:port */
        const char *close = strchr(s, ']');
        if (!close || (close[1] && close[1] != ':'))
            return false;
        h = s + 1;
        hlen = (size_t)(close - h);
        colon = close[1] ? close + 1 : NULL;
    } else {
        colon = strchr(s, ':');
        if (colon && strchr(colon + 1, ':'))
            colon = NULL;                  /* a bare IPv6 address */
        hlen = colon ? (size_t)(colon - s) : strlen(s);
    }
    if (hlen == 0 || hlen >= n || memchr(h, ' ', hlen))
        return false;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    if (!clean_text(host))
        return false;
    *port = default_port;
    if (colon) {
        unsigned long p;
        if (!parse_ulong(colon + 1, 65535, &p) || p == 0)
            return false;
        *port = (unsigned)p;
    }
    return true;
}

/* %d, %u and %% only: a typo in a path should not become a directory. */
static bool maildir_template_ok(const char *t)
{
    for (const char *p = strchr(t, '%'); p; p = strchr(p + 2, '%'))
        if (p[1] != 'd' && p[1] != 'u' && p[1] != '%')
            return false;
    return true;
}

static bool maildir_parse(const char *arg, struct target_spec *t, char *err,
                          size_t n)
{
    const char *home = getenv("HOME");
    bool ok;

    if (!strncmp(arg, "~/", 2) && home && home[0] == '/')
        ok = str_fmt(t->arg, sizeof t->arg, "%s/%s", home, arg + 2);
    else
        ok = str_copy(t->arg, arg, sizeof t->arg);
    if (!ok || t->arg[0] != '/') {
        snprintf(err, n, "maildir path must be absolute: %s", arg);
        return false;
    }
    if (!maildir_template_ok(t->arg)) {
        snprintf(err, n, "maildir path: only %%d, %%u and %%%% may follow "
                         "'%%'");
        return false;
    }
    return true;
}

static bool tcp_or_unix(const char *arg, unsigned default_port,
                        struct target_spec *t, char *err, size_t n)
{
    if (arg[0] == '/') {
        if (t->kind != TARGET_LMTP) {
            snprintf(err, n, "a unix socket is for lmtp: targets only");
            return false;
        }
        if (!str_copy(t->path, arg, sizeof t->path)) {
            snprintf(err, n, "socket path too long");
            return false;
        }
        return true;
    }
    if (!hostport_parse(arg, default_port, t->host, sizeof t->host,
                        &t->port)) {
        snprintf(err, n, "expected HOST:PORT, got \"%s\"", arg);
        return false;
    }
    return true;
}

bool target_parse(const char *text, struct target_spec *t, char *err,
                  size_t n)
{
    memset(t, 0, sizeof *t);
    str_copy(t->text, text, sizeof t->text);
    if (!strncmp(text, "smtp:", 5)) {
        t->kind = TARGET_SMTP;
        return tcp_or_unix(text + 5, 25, t, err, n);
    }
    if (!strncmp(text, "lmtp:", 5)) {
        t->kind = TARGET_LMTP;
        return tcp_or_unix(text + 5, 24, t, err, n);
    }
    if (!strncmp(text, "mda:", 4)) {
        t->kind = TARGET_MDA;
        if (!text[4] || !str_copy(t->arg, text + 4, sizeof t->arg)) {
            snprintf(err, n, "mda: needs a command (at most %d bytes)",
                     FETCH_TARGET_ARG_MAX - 1);
            return false;
        }
        return true;
    }
    if (!strncmp(text, "maildir:", 8)) {
        t->kind = TARGET_MAILDIR;
        return maildir_parse(text + 8, t, err, n);
    }
    snprintf(err, n, "unknown delivery target \"%.60s\" (smtp:, lmtp:, mda: "
                     "or maildir:)", text);
    return false;
}

/* Adds the comma- or space-separated domains of list to c->domains. */
static bool domains_add(struct fetch_conf *c, const char *list, char *err,
                        size_t n)
{
    char buf[CFG_LINE_MAX], *save = NULL;

    if (!str_copy(buf, list, sizeof buf)) {
        snprintf(err, n, "domain list too long");
        return false;
    }
    /* An empty list would mean bare ATRN, every domain of the account:
     * `--domains "$D"` with D unset must not widen the request. */
    if (!buf[strspn(buf, ", ")]) {
        snprintf(err, n, "empty domain list (leave the option out to fetch "
                         "every domain of the account)");
        return false;
    }
    for (char *d = strtok_r(buf, ", ", &save); d;
         d = strtok_r(NULL, ", ", &save)) {
        /* ATRN names domains in ASCII (RFC 2645): a U-label domain is
         * sent as its A-labels, which every server understands. */
        char key[IDNA_KEY_MAX + 1], probe[IDNA_KEY_MAX + 3];
        const char *why = "not a domain name";
        if (!addr_valid_domain(d, true) ||
            idna_domain_key(d, key, sizeof key, &why) != IDNA_OK) {
            snprintf(err, n, "not a domain name: \"%.80s\" (%s)", d, why);
            return false;
        }
        snprintf(probe, sizeof probe, ",%s,", key);
        char have[SMTP_LINE_MAX + 2];
        snprintf(have, sizeof have, ",%s,", c->domains);
        if (strstr(have, probe))
            continue;                       /* given twice */
        size_t len = strlen(c->domains);
        /* "ATRN " + list + CRLF must fit in one 512-octet command line */
        if (c->ndomains == FETCH_DOMAINS_MAX ||
            len + 1 + strlen(key) + 7 > SMTP_LINE_MAX) {
            snprintf(err, n, "too many domains for one ATRN command");
            return false;
        }
        snprintf(c->domains + len, sizeof c->domains - len, "%s%s",
                 len ? "," : "", key);
        c->ndomains++;
    }
    return true;
}

/* Every name in list is one of ALL_MECHS: a typo beside a valid name
 * would otherwise be dropped without a word. */
static bool mechs_known(const char *list, char *err, size_t n)
{
    char buf[sizeof ((struct fetch_conf *)0)->mechanisms], *save = NULL;
    const char *all = " " ALL_MECHS " ";

    if (!str_copy(buf, list, sizeof buf))
        return false;
    for (char *m = strtok_r(buf, ", ", &save); m;
         m = strtok_r(NULL, ", ", &save)) {
        char probe[sizeof buf + 2];
        snprintf(probe, sizeof probe, " %s ", m);
        if (!strstr(all, probe)) {
            snprintf(err, n, "unknown SASL mechanism \"%.40s\" (%s)", m,
                     ALL_MECHS);
            return false;
        }
    }
    return true;
}

static bool mechs_set(struct fetch_conf *c, const char *v, char *err,
                      size_t n)
{
    char probe[128];

    if (!str_copy(c->mechanisms, v, sizeof c->mechanisms)) {
        snprintf(err, n, "list too long");
        return false;
    }
    for (char *p = c->mechanisms; *p; p++)
        *p = (char)toupper((unsigned char)*p);
    if (!mechs_known(c->mechanisms, err, n))
        return false;
    /* Only the mechanisms we ever use count; the rest would silently
     * leave nothing to authenticate with. */
    if (c->mechanisms[0] &&
        !sasl_glue_client_candidates(ALL_MECHS, c->mechanisms, true, probe,
                                     sizeof probe)) {
        snprintf(err, n, "none of \"%s\" is supported (%s)", v, ALL_MECHS);
        return false;
    }
    return true;
}

static bool tls_set(struct fetch_conf *c, const char *v, char *err, size_t n)
{
    if (!strcmp(v, "require"))
        c->tls = TLS_REQUIRE;
    else if (!strcmp(v, "auto"))
        c->tls = TLS_AUTO;
    else if (!strcmp(v, "off"))
        c->tls = TLS_OFF;
    else {
        snprintf(err, n, "expected require, auto or off");
        return false;
    }
    return true;
}

static bool path_set(char *dst, size_t size, const char *v, char *err,
                     size_t n)
{
    if (!v[0] || !str_copy(dst, v, size)) {
        snprintf(err, n, v[0] ? "path too long" : "empty path");
        return false;
    }
    return true;
}

static bool timeout_set(struct fetch_conf *c, const char *v, char *err,
                        size_t n)
{
    long s;

    if (!parse_duration(v, &s) || s < 1 || s > FETCH_TIMEOUT_MAX) {
        snprintf(err, n, "expected seconds between 1 and %d (or 5m, 1h)",
                 FETCH_TIMEOUT_MAX);
        return false;
    }
    c->timeout = s;
    return true;
}

/* Push delivery: how long to stay after the queue is empty (XLINGER). */
static bool linger_set(struct fetch_conf *c, const char *v, char *err,
                       size_t n)
{
    long s;

    if (!parse_duration(v, &s) || s > FETCH_LINGER_MAX) {
        snprintf(err, n, "expected 0 (off) or seconds up to %d (or 30m, 1h)",
                 FETCH_LINGER_MAX);
        return false;
    }
    c->linger = s;
    return true;
}

static bool text_set(char *dst, size_t size, const char *v, char *err,
                     size_t n)
{
    if (!v[0] || !clean_text(v) || !str_copy(dst, v, size)) {
        snprintf(err, n, "empty, too long or contains control characters");
        return false;
    }
    return true;
}

/* One setting, from the file (from_file) or the command line. */
static bool set_key(struct loader *l, const char *key, const char *v,
                    bool from_file, char *err, size_t n)
{
    struct fetch_conf *c = l->c;

    if (!strcmp(key, "server")) {
        if (!hostport_parse(v, FETCH_DEFAULT_PORT, c->server,
                            sizeof c->server, &c->port)) {
            snprintf(err, n, "expected HOST or HOST:PORT");
            return false;
        }
        return true;
    }
    if (!strcmp(key, "user"))
        return text_set(c->user, sizeof c->user, v, err, n);
    if (!strcmp(key, "password") && from_file) {
        l->conf_password = true;
        return text_set(c->password, sizeof c->password, v, err, n);
    }
    if (!strcmp(key, "password_file")) {
        l->cli_password_file = !from_file;
        return path_set(c->password_file, sizeof c->password_file, v, err, n);
    }
    if (!strcmp(key, "mechanisms"))
        return mechs_set(c, v, err, n);
    if (!strcmp(key, "tls"))
        return tls_set(c, v, err, n);
    if (!strcmp(key, "ca_file")) {
        if (!path_set(c->ca_file, sizeof c->ca_file, v, err, n))
            return false;
        /* checked here too, so that a mistake in the file names its line */
        if (from_file && access(v, R_OK) != 0) {
            snprintf(err, n, "%s: %s", v, strerror(errno));
            return false;
        }
        return true;
    }
    if (!strcmp(key, "deliver"))
        return target_parse(v, &c->target, err, n);
    if (!strcmp(key, "domains")) {
        if (!from_file && !l->cli_domains) {
            c->domains[0] = '\0';           /* the command line replaces */
            c->ndomains = 0;
            l->cli_domains = true;
        }
        return domains_add(c, v, err, n);
    }
    if (!strcmp(key, "timeout"))
        return timeout_set(c, v, err, n);
    if (!strcmp(key, "linger"))
        return linger_set(c, v, err, n);
    if (!strcmp(key, "lock_file"))
        return path_set(c->lock_file, sizeof c->lock_file, v, err, n);
    snprintf(err, n, "unknown key");
    return false;
}

/* ---- the configuration file ----------------------------------------- */

static int file_key(void *ctx, const char *key, const char *value, char *err,
                    size_t errlen)
{
    return set_key(ctx, key, value, true, err, errlen) ? 0 : -1;
}

static void file_report(void *ctx, const char *msg)
{
    struct loader *l = ctx;
    l->problems++;
    fprintf(stderr, "odmr-fetch: %s\n", msg);
}

static bool group_or_world_readable(const struct stat *st)
{
    return (st->st_mode & (S_IRGRP | S_IROTH)) != 0;
}

/* Returns 0 or EX_CONFIG after saying why. */
static int load_file(struct loader *l)
{
    char err[PATH_MAX + 128];
    struct stat st;

    int r = cfg_parse_file(l->conf_path, file_key, file_report, l, err,
                           sizeof err);
    if (r < 0) {
        fprintf(stderr, "odmr-fetch: %s\n", err);
        return EX_CONFIG;
    }
    if (r > 0)
        return EX_CONFIG;
    if (l->conf_password &&
        (stat(l->conf_path, &st) != 0 || group_or_world_readable(&st))) {
        fprintf(stderr, "odmr-fetch: %s holds a password but is readable by "
                        "group or others (chmod 600 it)\n", l->conf_path);
        return EX_CONFIG;
    }
    return 0;
}

/* ---- the password ----------------------------------------------------- */

/* First line of path; refused when others could read it. */
static int read_password_file(struct fetch_conf *c)
{
    char line[FETCH_PASSWORD_MAX + 2];
    struct stat st;
    const char *path = c->password_file;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);

    if (fd < 0) {
        fprintf(stderr, "odmr-fetch: password file %s: %s\n", path,
                strerror(errno));
        return EX_CONFIG;
    }
    if (fstat(fd, &st) != 0 || group_or_world_readable(&st)) {
        fprintf(stderr, "odmr-fetch: password file %s is readable by group "
                        "or others (chmod 600 it)\n", path);
        close(fd);
        return EX_CONFIG;
    }
    ssize_t got = read(fd, line, sizeof line - 1);
    close(fd);
    got = got < 0 ? 0 : got;
    line[got] = '\0';
    line[strcspn(line, "\r\n")] = '\0';
    bool ok = line[0] && str_copy(c->password, line, sizeof c->password);
    explicit_bzero(line, sizeof line);
    if (!ok) {
        fprintf(stderr, "odmr-fetch: password file %s: %s first line\n",
                path, got > FETCH_PASSWORD_MAX ? "too long" : "empty");
        return EX_CONFIG;
    }
    return 0;
}

static int get_password(struct loader *l, int missing_status)
{
    struct fetch_conf *c = l->c;
    const char *env = getenv("ODMR_PASSWORD");
    int r = 0;

    if (l->cli_password_file) {
        r = read_password_file(c);
    } else if (env && env[0]) {
        if (!str_copy(c->password, env, sizeof c->password)) {
            fprintf(stderr, "odmr-fetch: ODMR_PASSWORD is too long\n");
            r = EX_CONFIG;
        }
    } else if (!l->conf_password && c->password_file[0]) {
        r = read_password_file(c);
    } else if (!l->conf_password) {
        fprintf(stderr, "odmr-fetch: no password: use --password-file, "
                        "ODMR_PASSWORD or password_file\n");
        r = missing_status;
    }
    /* Delivery commands we start must not inherit it. */
    if (env)
        explicit_bzero((char *)env, strlen(env));
    unsetenv("ODMR_PASSWORD");
    return r;
}

/* ---- the command line ------------------------------------------------ */

enum {
    OPT_PASSWORD_FILE = 256, OPT_MECH, OPT_TLS, OPT_CA_FILE, OPT_DELIVER,
    OPT_DOMAINS, OPT_TIMEOUT, OPT_LINGER, OPT_LOCK, OPT_HELP, OPT_VERSION,
};

static const struct option long_opts[] = {
    {"server", required_argument, NULL, 's'},
    {"user", required_argument, NULL, 'u'},
    {"password-file", required_argument, NULL, OPT_PASSWORD_FILE},
    {"mech", required_argument, NULL, OPT_MECH},
    {"tls", required_argument, NULL, OPT_TLS},
    {"ca-file", required_argument, NULL, OPT_CA_FILE},
    {"deliver", required_argument, NULL, OPT_DELIVER},
    {"domains", required_argument, NULL, OPT_DOMAINS},
    {"timeout", required_argument, NULL, OPT_TIMEOUT},
    {"linger", required_argument, NULL, OPT_LINGER},
    {"lock", required_argument, NULL, OPT_LOCK},
    {"verbose", no_argument, NULL, 'v'},
    {"help", no_argument, NULL, OPT_HELP},
    {"version", no_argument, NULL, OPT_VERSION},
    {NULL, 0, NULL, 0},
};

static const char *opt_key(int opt)
{
    switch (opt) {
    case 's': return "server";
    case 'u': return "user";
    case OPT_PASSWORD_FILE: return "password_file";
    case OPT_MECH: return "mechanisms";
    case OPT_TLS: return "tls";
    case OPT_CA_FILE: return "ca_file";
    case OPT_DELIVER: return "deliver";
    case OPT_DOMAINS: return "domains";
    case OPT_TIMEOUT: return "timeout";
    case OPT_LINGER: return "linger";
    case OPT_LOCK: return "lock_file";
    default: return NULL;
    }
}

/* Pass one: remembers the options.  Returns 0, -1 (help/version done) or
 * EX_USAGE. */
static int scan_args(struct loader *l, int argc, char **argv,
                     struct cli_opt *opts, size_t *nopts)
{
    int opt;

    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":c:s:u:vh", long_opts, NULL)) != -1) {
        if (opt == OPT_HELP || opt == 'h') {
            usage(stdout);
            return -1;
        }
        if (opt == OPT_VERSION) {
            printf("odmr-fetch %s\n", ODMR_VERSION);
            return -1;
        }
        if (opt == 'v') {
            l->c->verbose++;
        } else if (opt == 'c') {
            l->conf_path = optarg;
        } else if (opt_key(opt) && *nopts == CLI_MAX) {
            fprintf(stderr, "odmr-fetch: too many options\n");
            return EX_USAGE;
        } else if (opt_key(opt)) {
            opts[(*nopts)++] = (struct cli_opt){opt_key(opt), optarg};
        } else {
            if (opt == ':')
                fprintf(stderr, "odmr-fetch: option %s needs a value\n",
                        argv[optind - 1]);
            else
                fprintf(stderr, "odmr-fetch: unknown option %s\n",
                        argv[optind - 1]);
            fprintf(stderr, "Try 'odmr-fetch --help'.\n");
            return EX_USAGE;
        }
    }
    return 0;
}

/* Pass two: command line values over the file's. */
static int apply_args(struct loader *l, const struct cli_opt *opts,
                      size_t nopts, int argc, char **argv)
{
    char err[512];

    for (size_t i = 0; i < nopts; i++) {
        if (!set_key(l, opts[i].key, opts[i].value, false, err, sizeof err)) {
            fprintf(stderr, "odmr-fetch: %s: %s\n", opts[i].key, err);
            return EX_USAGE;
        }
    }
    for (int i = optind; i < argc; i++) {
        if (!set_key(l, "domains", argv[i], false, err, sizeof err)) {
            fprintf(stderr, "odmr-fetch: %s\n", err);
            return EX_USAGE;
        }
    }
    return 0;
}

static void defaults(struct fetch_conf *c)
{
    char err[128];

    memset(c, 0, sizeof *c);
    c->port = FETCH_DEFAULT_PORT;
    c->tls = TLS_REQUIRE;
    c->timeout = FETCH_DEFAULT_TIMEOUT;
    target_parse("smtp:127.0.0.1:25", &c->target, err, sizeof err);
    lock_default_path(c->lock_file, sizeof c->lock_file);
    system_fqdn(c->fqdn, sizeof c->fqdn);
}

/* Settings that have no default; missing ones are a usage error on the
 * command line and a configuration error when a file was given. */
static int check_required(struct loader *l, int missing_status)
{
    struct fetch_conf *c = l->c;

    if (!c->server[0] || !c->user[0]) {
        fprintf(stderr, "odmr-fetch: no %s given (%s)\n",
                c->server[0] ? "user" : "server",
                c->server[0] ? "-u NAME or user = NAME"
                             : "-s HOST[:PORT] or server = HOST");
        return missing_status;
    }
    if (c->ca_file[0] && access(c->ca_file, R_OK) != 0) {
        fprintf(stderr, "odmr-fetch: --ca-file %s: %s\n", c->ca_file,
                strerror(errno));
        return EX_CONFIG;
    }
    return 0;
}

int conf_load(struct fetch_conf *c, int argc, char **argv)
{
    struct cli_opt opts[CLI_MAX];
    size_t nopts = 0;
    struct loader l = {.c = c};

    defaults(c);
    int r = scan_args(&l, argc, argv, opts, &nopts);
    if (r == 0 && l.conf_path)
        r = load_file(&l);
    if (r == 0)
        r = apply_args(&l, opts, nopts, argc, argv);
    int missing = l.conf_path ? EX_CONFIG : EX_USAGE;
    if (r == 0)
        r = check_required(&l, missing);
    if (r == 0)
        r = get_password(&l, missing);
    if (r != 0)
        explicit_bzero(c->password, sizeof c->password);
    return r;
}
