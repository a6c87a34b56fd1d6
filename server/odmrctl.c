/* odmrctl.c - administration of odmrd (SPEC 3.3): accounts, domains, queue
 * inspection and removal, queueing a message from a pipe, and recipient
 * lists (SPEC 6).  This file has main, the options, the dispatch, the
 * configuration and privileges and what the commands share; the commands
 * are in odmrctl_*.c (see odmrctl.h).
 *
 *   odmrctl [-c FILE] COMMAND ...
 *
 * Choices made where SPEC is silent (also in odmrctl(8)):
 *
 * Exit status (sysexits):
 *   0  success
 *   64 usage: unknown command or option, wrong number of arguments
 *   65 bad data: invalid account name, domain, address or queue id;
 *      account already exists (user add); no such account (user passwd /
 *      del, domain add); domain bound to another account (domain add);
 *      domain not bound (domain del); unknown queue id (queue delete and
 *      queue bounce, after the other ids were processed); empty, unreadable
 *      or mismatched
 *      password; too many recipients; message too large; more than 50
 *      Received: headers (mail loop); an unreadable envelope in a listing;
 *      a recipient ADDR of another domain or that no list can hold, a bad
 *      line of recipient import (then nothing is stored), an import file
 *      that cannot be read
 *   67 enqueue: a recipient domain is not bound to any account; recipient:
 *      the domain is not bound
 *   73 cannot create: the account database or the spool cannot be created
 *      because a directory is missing
 *   74 output error on stdout
 *   75 temporary: database locked for too long, I/O error, disk full,
 *      domain_quota exceeded, a domain busy being delivered (queue delete,
 *      queue bounce), a bounce that could not be queued (the message stays)
 *   77 permission denied (file modes, or not run as the daemon user/root)
 *   78 configuration file problems (each printed as "file:line: ...")
 * Every error is one line "odmrctl: ..." on stderr.
 *
 * Listings read a missing database or spool as empty: both are created on
 * first use, and "nothing there yet" is the truth on a fresh install.
 *
 * Privileges: run as root, odmrctl becomes the owner of spool_dir (or the
 * configured `user` when the spool does not exist yet) before touching the
 * queue or the database, so files it creates stay owned by the daemon user,
 * the way Postfix's postdrop works; it switches exactly as odmrd does
 * (server/ownership.h).  A permission error (exit 77) ends with whom it
 * acted as, e.g. "(acting as user odmr, the owner of the spool)", since
 * a root shell would otherwise not see why root was refused.  umask is
 * 077: nothing it creates is readable by others.
 *
 * Output formats are documented next to the functions printing them. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"
#include "odmrctl.h"
#include "ownership.h"

/* ================================================================ errors */

/* Who odmrctl is when it touches the spool and the database, for
 * permission errors: "acting as user odmr" after root switched, else
 * "running as user alice".  Empty until the configuration is loaded. */
static char identity_note[128];

/* Prints "odmrctl: <message>" on stderr and returns code.  A permission
 * error says whose permission it was: root acts as another user here. */
int fail(int code, const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fputs("odmrctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (code == EX_NOPERM && identity_note[0])
        fprintf(stderr, " (%s)", identity_note);
    fputc('\n', stderr);
    return code;
}

int usage_error(const char *usage)
{
    return fail(EX_USAGE, "usage: odmrctl %s", usage);
}

/* Exit status for a system error while queueing or removing mail. */
int errno_status(int err)
{
    switch (err) {
    case EACCES:
    case EPERM:
        return EX_NOPERM;
    case ENOENT:
    case ENOTDIR:
        return EX_CANTCREAT;
    default:   /* ENOSPC, EDQUOT, EIO and anything unexpected: retry later */
        return EX_TEMPFAIL;
    }
}

/* Exit status for a failure to read or change what exists: a missing
 * directory is not "cannot create" here. */
int access_status(int err)
{
    return (err == EACCES || err == EPERM) ? EX_NOPERM : EX_TEMPFAIL;
}

/* Errors every account command reports the same way. */
int acct_status(const struct ctl *c, enum acct_result r)
{
    switch (r) {
    case ACCT_OK:
        return EX_OK;
    case ACCT_TEMPFAIL:
        return fail(EX_TEMPFAIL, "%s: %s, try again later",
                    c->conf.accounts_db, acct_strerror(r));
    case ACCT_PERM:
        return fail(EX_NOPERM, "%s: %s", c->conf.accounts_db, acct_strerror(r));
    case ACCT_NODB:
        return fail(EX_CANTCREAT, "%s: %s", c->conf.accounts_db,
                    acct_strerror(r));
    default:
        return fail(EX_DATAERR, "%s: %s", c->conf.accounts_db, acct_strerror(r));
    }
}

/* Control characters from envelopes (remote reply texts) must not reach
 * the terminal. */
const char *printable(const char *s, char *buf, size_t n)
{
    size_t i = 0;
    for (; s[i] && i + 1 < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        buf[i] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    buf[i] = '\0';
    return buf;
}

/* A failure to list the queue (domain NULL) or one domain's part of it. */
int queue_read_error(const struct ctl *c, const char *domain)
{
    int err = errno;
    int code = access_status(err);
    if (domain)
        return fail(code, "cannot read the queue of %s in %s: %s", domain,
                    c->conf.spool_dir, strerror(err));
    return fail(code, "cannot read the queue in %s: %s", c->conf.spool_dir,
                strerror(err));
}

/* ================================================================ setup */

static void print_report(void *ctx, const char *msg)
{
    (void)ctx;
    fail(0, "%s", msg);
}

/* The user the daemon runs as, judged by who owns the spool (odmrd gives
 * it the whole spool at start); the configured user before the spool
 * exists; root when neither says otherwise. */
static int daemon_identity(const struct odmrd_conf *conf, struct own_user *u,
                           const char **why)
{
    struct stat st;
    *why = "the configured user";
    if (stat(conf->spool_dir, &st) == 0) {
        own_user_by_uid(st.st_uid, st.st_gid, u);
        *why = "the owner of the spool";
        return EX_OK;
    }
    if (conf->user[0] && !own_user_by_name(conf->user, u))
        return fail(EX_CONFIG, "%s: user %s does not exist", conf->path,
                    conf->user);
    if (!conf->user[0])
        own_user_by_uid(0, 0, u);
    return EX_OK;
}

/* Root becomes the daemon user, exactly as odmrd does, so that what
 * odmrctl creates in the spool and the database stays usable (and owned)
 * by odmrd. */
static int drop_privileges(const struct odmrd_conf *conf)
{
    struct own_user u;
    own_user_by_uid(geteuid(), getegid(), &u);
    snprintf(identity_note, sizeof identity_note, "running as user %s", u.name);
    if (geteuid() != 0)
        return EX_OK;
    const char *why;
    int rc = daemon_identity(conf, &u, &why);
    if (rc != EX_OK || u.uid == 0)
        return rc;
    char err[256];
    if (!own_become(&u, err, sizeof err))
        return fail(EX_NOPERM, "cannot switch to user %s: %s", u.name, err);
    snprintf(identity_note, sizeof identity_note, "acting as user %s, %s",
             u.name, why);
    return EX_OK;
}

/* Loads the configuration and drops privileges; done once, after the
 * command's arguments were checked, so usage errors come first. */
int ctl_prepare(struct ctl *c)
{
    if (c->ready)
        return EX_OK;
    if (conf_load(&c->conf, c->conf_path, print_report, NULL) != 0)
        return EX_CONFIG;
    if (!c->conf.hostname[0])
        str_copy(c->conf.hostname, "localhost", sizeof c->conf.hostname);
    int rc = drop_privileges(&c->conf);
    if (rc != EX_OK)
        return rc;
    c->ready = true;
    return EX_OK;
}

/* ========================================================== string lists */

void strlist_add(struct strlist *l, const char *s)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 32;
        char **v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            l->failed = true;
            return;
        }
        l->v = v;
        l->cap = cap;
    }
    char *copy = strdup(s);
    if (!copy) {
        l->failed = true;
        return;
    }
    l->v[l->n++] = copy;
}

void strlist_free(struct strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    memset(l, 0, sizeof *l);
}

void collect_name(void *ctx, const char *name)
{
    strlist_add(ctx, name);
}

int collect_string(void *ctx, const char *s)
{
    strlist_add(ctx, s);
    return 0;
}

void collect_binding(void *ctx, const char *domain, const char *name)
{
    struct bindings *b = ctx;
    strlist_add(&b->domains, domain);
    strlist_add(&b->names, name);
}

/* ========================================================== domain names */

int check_domain(const char *domain)
{
    char key[IDNA_KEY_MAX + 1];
    const char *why = "not a domain name";
    if (addr_valid_domain(domain, true) &&
        idna_domain_key(domain, key, sizeof key, &why) == IDNA_OK)
        return EX_OK;
    return fail(EX_DATAERR, "invalid domain name \"%s\" (%s)", domain, why);
}

/* A queue or binding key as people read it: U-labels for A-labels.  The
 * listing columns stay "one word", so scripts can split them; every
 * command takes either spelling back. */
const char *readable_domain(const char *key, char *buf, size_t n)
{
    char shown[4 * IDNA_KEY_MAX + 1];
    idna_display(key, shown, sizeof shown);
    return printable(shown, buf, n);
}

/* ================================================================== main */

static void print_help(void)
{
    printf(
        "Usage: odmrctl [-c FILE] COMMAND ...\n"
        "Administration of odmrd, the On-Demand Mail Relay server.\n"
        "\n"
        "Options:\n"
        "  -c FILE        configuration file (default " ODMRD_CONF_DEFAULT ")\n"
        "  --help         show this help and exit\n"
        "  --version      show the version and exit\n"
        "\n"
        "Commands:\n"
        "  user add NAME            create an account; the password is the first\n"
        "                           line of stdin, or asked twice on a terminal\n"
        "  user passwd NAME         change an account's password (same input)\n"
        "  user del NAME            delete an account and its domain bindings\n"
        "  user list                accounts, each with its domains\n"
        "  domain add DOMAIN NAME   bind DOMAIN to account NAME\n"
        "  domain del DOMAIN        unbind DOMAIN (and drop its recipient list)\n"
        "  domain list              \"DOMAIN ACCOUNT\" lines\n"
        "  queue [DOMAIN]           list queued messages\n"
        "  queue summary            messages, bytes and oldest age per domain\n"
        "  queue delete ID...       remove messages without notice\n"
        "  queue delete --domain D  remove every message queued for D\n"
        "  queue bounce ID...       return messages to their senders now, with a\n"
        "                           delivery status notification\n"
        "  queue quarantine [DOMAIN]\n"
        "                           messages a milter held, with the reason\n"
        "  queue release ID...      put held messages back into the queue\n"
        "  enqueue [-f SENDER] [--] RCPT...\n"
        "                           queue the message read from stdin\n"
        "  recipient add DOMAIN ADDR...\n"
        "                           accept only listed recipients for DOMAIN\n"
        "                           (user@DOMAIN or user; @DOMAIN = catch-all),\n"
        "                           others get 550 5.1.1 at RCPT\n"
        "  recipient del DOMAIN ADDR...\n"
        "                           remove entries; without entries left DOMAIN\n"
        "                           accepts every recipient again\n"
        "  recipient list DOMAIN    the list, one address a line\n"
        "  recipient import DOMAIN FILE\n"
        "                           add FILE's addresses, one a line (- = stdin;\n"
        "                           blank and # lines skipped; any bad line: none)\n"
        "\n"
        "Exit status: 0 ok, 64 usage, 65 bad data, 67 domain not hosted,\n"
        "73 cannot create, 75 temporary failure, 77 permission denied,\n"
        "78 configuration error.\n");
}

struct command {
    const char *name;
    int (*run)(struct ctl *c, int argc, char **argv);
};

static const struct command commands[] = {
    {"user", cmd_user},
    {"domain", cmd_domain},
    {"queue", cmd_queue},
    {"enqueue", cmd_enqueue},
    {"recipient", cmd_recipient},
};

static const struct command *find_command(const char *name)
{
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(commands[i].name, name))
            return &commands[i];
    return NULL;
}

/* Output that did not reach stdout is an error, not a silent success. */
static int finish(int rc)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        int code = fail(EX_IOERR, "error writing output: %s", strerror(errno));
        return rc ? rc : code;
    }
    return rc;
}

/* Global options; returns the index of the command, or -1 with *rc set. */
static int parse_options(int argc, char **argv, struct ctl *c, int *rc)
{
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            print_help();
            *rc = EX_OK;
            return -1;
        }
        if (!strcmp(a, "--version")) {
            printf("odmrctl " ODMR_VERSION "\n");
            *rc = EX_OK;
            return -1;
        }
        if (!strcmp(a, "--")) {
            i++;
            break;
        }
        if (!strcmp(a, "-c") && i + 1 < argc) {
            c->conf_path = argv[++i];
            continue;
        }
        if (!strncmp(a, "-c", 2) && a[2]) {
            c->conf_path = a + 2;
            continue;
        }
        *rc = fail(EX_USAGE, "unknown option or missing argument: %s "
                   "(see odmrctl --help)", a);
        return -1;
    }
    if (i >= argc) {
        *rc = fail(EX_USAGE, "no command given (see odmrctl --help)");
        return -1;
    }
    return i;
}

int main(int argc, char **argv)
{
    static struct ctl ctl;
    int rc = EX_OK;
    ctl.conf_path = ODMRD_CONF_DEFAULT;
    ctl.caller = getuid();
    int i = parse_options(argc, argv, &ctl, &rc);
    if (i < 0)
        return finish(rc);
    const struct command *cmd = find_command(argv[i]);
    if (!cmd)
        return fail(EX_USAGE, "unknown command \"%s\" (see odmrctl --help)",
                    argv[i]);
    umask(077);
    log_open("odmrctl", false, false);
    accounts_empty_means_none();   /* user add starts a truncated file anew */
    rc = cmd->run(&ctl, argc - i - 1, argv + i + 1);
    return finish(rc);
}
