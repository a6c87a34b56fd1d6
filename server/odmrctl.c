/* odmrctl.c - administration of odmrd (SPEC 3.3): accounts, domains, queue
 * inspection and removal, and queueing a message from a pipe.
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
 *      Received: headers (mail loop); an unreadable envelope in a listing
 *   67 enqueue: a recipient domain is not bound to any account
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
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"
#include "accounts.h"
#include "bounce.h"
#include "conf.h"
#include "envelope.h"
#include "ownership.h"
#include "queue.h"

/* RFC 5321 6.3: a message that went through this many hops is looping. */
#define MAX_RECEIVED_HEADERS 50
#define RECEIVED_PREFIX "Received:"
#define RECEIVED_PREFIX_LEN 9
/* Input is read in chunks of this size; normalising line ends can at most
 * double a chunk. */
#define ENQUEUE_CHUNK 65536
/* queue delete waits this long for a delivering session to finish. */
#define DOMAIN_LOCK_WAIT_MS 5000
#define DOMAIN_LOCK_STEP_MS 100
/* Column layout of the queue listing. */
#define QID_COLUMN 20
#define LIST_INDENT (QID_COLUMN + 1 + 8 + 1 + 19 + 1)

struct ctl {
    const char *conf_path;
    bool ready;                /* configuration loaded, privileges dropped */
    uid_t caller;              /* real uid of the invoking user */
    struct odmrd_conf conf;
    struct queue q;
};

/* ================================================================ errors */

/* Who odmrctl is when it touches the spool and the database, for
 * permission errors: "acting as user odmr" after root switched, else
 * "running as user alice".  Empty until the configuration is loaded. */
static char identity_note[128];

static int fail(int code, const char *fmt, ...) PRINTF_LIKE(2, 3);

/* Prints "odmrctl: <message>" on stderr and returns code.  A permission
 * error says whose permission it was: root acts as another user here. */
static int fail(int code, const char *fmt, ...)
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

static int usage_error(const char *usage)
{
    return fail(EX_USAGE, "usage: odmrctl %s", usage);
}

/* Exit status for a system error while queueing or removing mail. */
static int errno_status(int err)
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
static int access_status(int err)
{
    return (err == EACCES || err == EPERM) ? EX_NOPERM : EX_TEMPFAIL;
}

/* Errors every account command reports the same way. */
static int acct_status(const struct ctl *c, enum acct_result r)
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
static const char *printable(const char *s, char *buf, size_t n)
{
    size_t i = 0;
    for (; s[i] && i + 1 < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        buf[i] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    buf[i] = '\0';
    return buf;
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
static int ctl_prepare(struct ctl *c)
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

/* ============================================================= passwords */

static struct termios saved_termios;
static volatile sig_atomic_t echo_is_off;

/* A signal while echo is off must not leave the terminal without echo. */
static void restore_echo_and_die(int sig)
{
    if (echo_is_off)
        tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved_termios);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void catch_signals(void (*handler)(int))
{
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &sa, NULL);
}

/* Reads one line from fd 0 byte by byte: nothing after the line is
 * consumed and no stdio buffer keeps a copy of the password.  CR LF and LF
 * end the line. */
static int read_password_line(char *pw, size_t n)
{
    size_t len = 0;
    bool too_long = false, control = false;
    for (;;) {
        char ch;
        ssize_t got = read(STDIN_FILENO, &ch, 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            explicit_bzero(pw, n);
            return fail(EX_DATAERR, "cannot read the password: %s",
                        strerror(errno));
        }
        if (got == 0 || ch == '\n')
            break;
        if (len + 1 < n)
            pw[len++] = ch;
        else
            too_long = true;
    }
    pw[len] = '\0';
    if (len > 0 && pw[len - 1] == '\r')
        pw[--len] = '\0';
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)pw[i] < 0x20 || pw[i] == 0x7f)
            control = true;
    int rc = EX_OK;
    if (too_long)
        rc = fail(EX_DATAERR, "password too long (at most %d bytes)",
                  PASSWORD_MAX);
    else if (control)
        rc = fail(EX_DATAERR, "password contains control characters");
    else if (len == 0)
        rc = fail(EX_DATAERR, "empty password");
    if (rc != EX_OK)
        explicit_bzero(pw, n);
    return rc;
}

static int prompt_once(const char *prompt, char *pw, size_t n)
{
    struct termios quiet;
    fputs(prompt, stderr);
    fflush(stderr);
    if (tcgetattr(STDIN_FILENO, &saved_termios) != 0)
        return fail(EX_DATAERR, "cannot read the terminal: %s", strerror(errno));
    quiet = saved_termios;
    quiet.c_lflag &= ~(tcflag_t)ECHO;
    catch_signals(restore_echo_and_die);
    echo_is_off = 1;
    tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet);
    int rc = read_password_line(pw, n);
    tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved_termios);
    echo_is_off = 0;
    catch_signals(SIG_DFL);
    fputc('\n', stderr);   /* the user's Enter was not echoed */
    return rc;
}

/* The password for user add / passwd: the first line of stdin when it is
 * a pipe or file (scripts), else asked twice on the terminal.  pw has
 * PASSWORD_MAX + 1 bytes. */
static int read_password(char *pw, size_t n)
{
    if (!isatty(STDIN_FILENO))
        return read_password_line(pw, n);
    char again[PASSWORD_MAX + 1];
    int rc = prompt_once("Password: ", pw, n);
    if (rc == EX_OK)
        rc = prompt_once("Retype password: ", again, sizeof again);
    if (rc == EX_OK && strcmp(pw, again) != 0)
        rc = fail(EX_DATAERR, "passwords do not match");
    explicit_bzero(again, sizeof again);
    if (rc != EX_OK)
        explicit_bzero(pw, n);
    return rc;
}

/* ========================================================== string lists */

struct strlist {
    char **v;
    size_t n, cap;
    bool failed;    /* an allocation failed: the list is incomplete */
};

static void strlist_add(struct strlist *l, const char *s)
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

static void strlist_free(struct strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    memset(l, 0, sizeof *l);
}

static void collect_name(void *ctx, const char *name)
{
    strlist_add(ctx, name);
}

static int collect_string(void *ctx, const char *s)
{
    strlist_add(ctx, s);
    return 0;
}

/* Domain bindings as parallel lists. */
struct bindings {
    struct strlist domains, names;
};

static void collect_binding(void *ctx, const char *domain, const char *name)
{
    struct bindings *b = ctx;
    strlist_add(&b->domains, domain);
    strlist_add(&b->names, name);
}

/* ================================================================= users */

static int check_account_name(const char *name)
{
    if (account_name_valid(name))
        return EX_OK;
    return fail(EX_DATAERR, "invalid account name \"%s\": 1 to %d printable "
                "ASCII characters, no spaces and no ':'", name,
                ACCOUNT_NAME_MAX);
}

static int user_add(struct ctl *c, const char *name)
{
    const char *db = c->conf.accounts_db;
    /* Ask before prompting: typing a password twice for nothing is rude. */
    enum acct_result r = accounts_password(db, name, NULL, 0);
    if (r == ACCT_OK)
        return fail(EX_DATAERR, "account %s already exists", name);
    if (r != ACCT_NOTFOUND && r != ACCT_NODB)
        return acct_status(c, r);
    char pw[PASSWORD_MAX + 1];
    int rc = read_password(pw, sizeof pw);
    if (rc != EX_OK)
        return rc;
    r = accounts_user_add(db, name, pw);
    explicit_bzero(pw, sizeof pw);
    if (r == ACCT_OK) {
        log_info("account %s added by uid %lu", name, (unsigned long)c->caller);
        return EX_OK;
    }
    if (r == ACCT_EXISTS)
        return fail(EX_DATAERR, "account %s already exists", name);
    if (r == ACCT_NODB)
        return fail(EX_CANTCREAT, "cannot create %s: its directory does not "
                    "exist", db);
    return acct_status(c, r);
}

static int no_such_account(const char *name)
{
    return fail(EX_DATAERR, "account %s does not exist", name);
}

static int user_passwd(struct ctl *c, const char *name)
{
    const char *db = c->conf.accounts_db;
    enum acct_result r = accounts_password(db, name, NULL, 0);
    if (r == ACCT_NOTFOUND || r == ACCT_NODB)
        return no_such_account(name);
    if (r != ACCT_OK)
        return acct_status(c, r);
    char pw[PASSWORD_MAX + 1];
    int rc = read_password(pw, sizeof pw);
    if (rc != EX_OK)
        return rc;
    r = accounts_user_passwd(db, name, pw);
    explicit_bzero(pw, sizeof pw);
    if (r == ACCT_OK) {
        log_info("password of account %s changed by uid %lu", name,
                 (unsigned long)c->caller);
        return EX_OK;
    }
    if (r == ACCT_NOTFOUND || r == ACCT_NODB)
        return no_such_account(name);
    return acct_status(c, r);
}

static int user_del(struct ctl *c, const char *name)
{
    enum acct_result r = accounts_user_del(c->conf.accounts_db, name);
    if (r == ACCT_OK) {
        log_info("account %s and its domain bindings deleted by uid %lu", name,
                 (unsigned long)c->caller);
        return EX_OK;
    }
    if (r == ACCT_NOTFOUND || r == ACCT_NODB)
        return no_such_account(name);
    return acct_status(c, r);
}

/* Sorts the bindings by (account, domain), keeping the lists parallel. */
static int binding_cmp(const void *a, const void *b)
{
    char *const *x = a, *const *y = b;
    int r = strcmp(x[1], y[1]);
    return r ? r : strcmp(x[0], y[0]);
}

/* "user list": one line per account, "NAME DOMAIN DOMAIN ...", accounts
 * and each account's domains sorted. */
static void print_users(const struct strlist *users, const struct bindings *b)
{
    size_t n = b->domains.n;
    char **pairs = n ? malloc(n * 2 * sizeof *pairs) : NULL;
    if (!pairs)
        n = 0;
    for (size_t i = 0; i < n; i++) {
        pairs[2 * i] = b->domains.v[i];
        pairs[2 * i + 1] = b->names.v[i];
    }
    if (n > 1)
        qsort(pairs, n, 2 * sizeof *pairs, binding_cmp);
    size_t j = 0;
    for (size_t i = 0; i < users->n; i++) {
        const char *u = users->v[i];
        fputs(u, stdout);
        while (j < n && strcmp(pairs[2 * j + 1], u) < 0)
            j++;
        for (; j < n && strcmp(pairs[2 * j + 1], u) == 0; j++)
            printf(" %s", pairs[2 * j]);
        putchar('\n');
    }
    free(pairs);
}

static int user_list(struct ctl *c)
{
    struct strlist users = {0};
    struct bindings b = {{0}, {0}};
    enum acct_result r = accounts_users(c->conf.accounts_db, collect_name, &users);
    if (r == ACCT_OK)
        r = accounts_domains(c->conf.accounts_db, collect_binding, &b);
    int rc = EX_OK;
    if (users.failed || b.domains.failed || b.names.failed ||
        b.domains.n != b.names.n)
        rc = fail(EX_TEMPFAIL, "out of memory");
    else if (r == ACCT_OK)
        print_users(&users, &b);
    else if (r != ACCT_NODB)
        rc = acct_status(c, r);
    strlist_free(&users);
    strlist_free(&b.domains);
    strlist_free(&b.names);
    return rc;
}

static int cmd_user(struct ctl *c, int argc, char **argv)
{
    static const char usage[] = "user add|passwd|del NAME | user list";
    if (argc == 1 && !strcmp(argv[0], "list")) {
        int rc = ctl_prepare(c);
        return rc ? rc : user_list(c);
    }
    if (argc != 2)
        return usage_error(usage);
    const char *sub = argv[0], *name = argv[1];
    int (*fn)(struct ctl *, const char *) =
        !strcmp(sub, "add") ? user_add
        : !strcmp(sub, "passwd") ? user_passwd
        : !strcmp(sub, "del") ? user_del : NULL;
    if (!fn)
        return usage_error(usage);
    int rc = check_account_name(name);
    if (rc == EX_OK)
        rc = ctl_prepare(c);
    return rc ? rc : fn(c, name);
}

/* =============================================================== domains */

static int check_domain(const char *domain)
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
static const char *readable_domain(const char *key, char *buf, size_t n)
{
    char shown[4 * IDNA_KEY_MAX + 1];
    idna_display(key, shown, sizeof shown);
    return printable(shown, buf, n);
}

static int domain_add(struct ctl *c, const char *domain, const char *name)
{
    const char *db = c->conf.accounts_db;
    enum acct_result r = accounts_domain_add(db, domain, name);
    if (r == ACCT_OK) {
        log_info("domain %s bound to account %s by uid %lu", domain, name,
                 (unsigned long)c->caller);
        return EX_OK;
    }
    if (r == ACCT_NOTFOUND || r == ACCT_NODB)
        return no_such_account(name);
    if (r == ACCT_EXISTS) {
        char owner[ACCOUNT_NAME_MAX + 1];
        if (accounts_domain_owner(db, domain, owner, sizeof owner) != ACCT_OK)
            str_copy(owner, "another account", sizeof owner);
        return fail(EX_DATAERR, "domain %s is already bound to account %s",
                    domain, owner);
    }
    return acct_status(c, r);
}

static int domain_del(struct ctl *c, const char *domain)
{
    const char *db = c->conf.accounts_db;
    char owner[ACCOUNT_NAME_MAX + 1] = "";
    accounts_domain_owner(db, domain, owner, sizeof owner);  /* for the log */
    enum acct_result r = accounts_domain_del(db, domain);
    if (r == ACCT_OK) {
        log_info("domain %s unbound from account %s by uid %lu", domain,
                 owner[0] ? owner : "?", (unsigned long)c->caller);
        return EX_OK;
    }
    if (r == ACCT_NOTFOUND || r == ACCT_NODB)
        return fail(EX_DATAERR, "domain %s is not bound to an account", domain);
    return acct_status(c, r);
}

static void print_binding(void *ctx, const char *domain, const char *name)
{
    char shown[4 * IDNA_KEY_MAX + 1];
    (void)ctx;
    printf("%s %s\n", readable_domain(domain, shown, sizeof shown), name);
}

/* "domain list": "DOMAIN ACCOUNT" lines sorted by domain. */
static int domain_list(struct ctl *c)
{
    enum acct_result r = accounts_domains(c->conf.accounts_db, print_binding,
                                          NULL);
    return r == ACCT_NODB ? EX_OK : acct_status(c, r);
}

static int cmd_domain(struct ctl *c, int argc, char **argv)
{
    static const char usage[] =
        "domain add DOMAIN NAME | domain del DOMAIN | domain list";
    const char *sub = argc > 0 ? argv[0] : "";
    int rc;
    if (!strcmp(sub, "list") && argc == 1) {
        rc = ctl_prepare(c);
        return rc ? rc : domain_list(c);
    }
    if (!strcmp(sub, "add") && argc == 3) {
        rc = check_domain(argv[1]);
        if (rc == EX_OK)
            rc = check_account_name(argv[2]);
        if (rc == EX_OK)
            rc = ctl_prepare(c);
        return rc ? rc : domain_add(c, argv[1], argv[2]);
    }
    if (!strcmp(sub, "del") && argc == 2) {
        /* No syntax check: a binding that exists can always be removed. */
        if (!argv[1][0])
            return check_domain(argv[1]);
        rc = ctl_prepare(c);
        return rc ? rc : domain_del(c, argv[1]);
    }
    return usage_error(usage);
}

/* ============================================================ queue: open */

/* Opens the queue for reading.  *exists is false when the spool (or its
 * q/ directory) has not been created yet: an empty queue. */
static int open_queue_for_reading(struct ctl *c, bool *exists)
{
    char qdir[PATH_MAX];
    struct stat st;
    *exists = false;
    if (!str_fmt(qdir, sizeof qdir, "%s/q", c->conf.spool_dir))
        return fail(EX_CONFIG, "spool_dir %s: path too long", c->conf.spool_dir);
    if (stat(qdir, &st) != 0) {
        if (errno == ENOENT)
            return EX_OK;
        return fail(access_status(errno), "%s: %s", qdir, strerror(errno));
    }
    char err[PATH_MAX + 64];
    if (!queue_open(&c->q, c->conf.spool_dir, err, sizeof err))
        return fail(access_status(errno), "%s", err);
    *exists = true;
    return EX_OK;
}

/* A domain argument as the queue names it: its key (common/idna.h). */
static int queue_domain_arg(const char *arg, char *key, size_t n)
{
    int rc = check_domain(arg);
    if (rc == EX_OK)
        idna_domain_key(arg, key, n, NULL);
    return rc;
}

/* A failure to list the queue (domain NULL) or one domain's part of it. */
static int queue_read_error(const struct ctl *c, const char *domain)
{
    int err = errno;
    int code = access_status(err);
    if (domain)
        return fail(code, "cannot read the queue of %s in %s: %s", domain,
                    c->conf.spool_dir, strerror(err));
    return fail(code, "cannot read the queue in %s: %s", c->conf.spool_dir,
                strerror(err));
}

/* ========================================================= queue: listing */

struct listing {
    struct ctl *c;
    const char *domain;
    unsigned long messages;
    uint64_t bytes;
    int rc;
};

static void format_utc(time_t t, char *buf, size_t n)
{
    struct tm tm;
    if (!gmtime_r(&t, &tm) || !strftime(buf, n, "%Y-%m-%d %H:%M:%S", &tm))
        str_copy(buf, "0000-00-00 00:00:00", n);
}

/* Format of "odmrctl queue" (times in UTC, so that output does not depend
 * on the caller's time zone):
 *
 * -Queue ID-           --Size-- -Arrival Time, UTC- -Sender/Domain/Recipients-
 * 6650A1B2C3D4E1F2A        1234 2024-05-24 09:15:02 alice@example.net
 *                                                   domain: example.org
 *                                                   bob@example.org
 *                                                   eve@example.org (451 4.2.0 try later)
 *
 * -- 1 message, 1234 bytes
 *
 * The null sender prints as "<>".  A message queued for several domains is
 * listed once per domain, with that domain's recipients. */
static void print_list_header(void)
{
    printf("%-*s %8s %-19s %s\n", QID_COLUMN, "-Queue ID-", "--Size--",
           "-Arrival Time, UTC-", "-Sender/Domain/Recipients-");
}

static void print_envelope(const struct envelope *e)
{
    char when[32], buf[LAST_REPLY_MAX + 1], buf2[ADDR_MAX + 1];
    format_utc(e->arrival, when, sizeof when);
    printf("%-*s %8" PRIu64 " %s %s\n", QID_COLUMN, printable(e->id, buf, sizeof buf),
           e->size, when,
           e->sender[0] ? printable(e->sender, buf2, sizeof buf2) : "<>");
    printf("%*sdomain: %s\n", LIST_INDENT, "",
           readable_domain(e->domain, buf, sizeof buf));
    for (size_t i = 0; i < e->nrcpt; i++) {
        const struct env_rcpt *r = &e->rcpt[i];
        printf("%*s%s", LIST_INDENT, "", printable(r->addr, buf2, sizeof buf2));
        if (r->last_reply[0])
            printf(" (%s)", printable(r->last_reply, buf, sizeof buf));
        putchar('\n');
    }
    putchar('\n');
}

/* Loads an envelope; a message delivered since the directory was listed
 * is skipped quietly, a broken one reported. */
static bool load_envelope(struct ctl *c, const char *domain, const char *id,
                          struct envelope *e, int *rc)
{
    char err[PATH_MAX + 128];
    envelope_init(e);
    errno = 0;
    if (queue_load(&c->q, domain, id, e, err, sizeof err))
        return true;
    if (errno != ENOENT) {
        if (errno == EACCES)
            *rc = fail(EX_NOPERM, "%s: %s", id, err);
        else
            *rc = fail(EX_DATAERR, "%s: unreadable envelope: %s", id, err);
    }
    envelope_free(e);
    return false;
}

static int list_message(void *ctx, const char *id)
{
    struct listing *l = ctx;
    struct envelope e;
    if (!load_envelope(l->c, l->domain, id, &e, &l->rc))
        return 0;
    if (l->messages == 0)
        print_list_header();
    print_envelope(&e);
    l->messages++;
    l->bytes += e.size;
    envelope_free(&e);
    return 0;
}

static int list_domain(void *ctx, const char *domain)
{
    struct listing *l = ctx;
    l->domain = domain;
    if (queue_ids(&l->c->q, domain, list_message, l) < 0)
        l->rc = queue_read_error(l->c, domain);
    return 0;
}

static void print_list_total(const struct listing *l, const char *domain)
{
    if (l->messages == 0) {
        if (domain)
            printf("Queue for %s is empty\n", domain);
        else
            printf("Queue is empty\n");
        return;
    }
    printf("-- %lu message%s, %" PRIu64 " byte%s\n", l->messages,
           l->messages == 1 ? "" : "s", l->bytes, l->bytes == 1 ? "" : "s");
}

static int queue_list(struct ctl *c, const char *domain_arg)
{
    char domain[ADDR_DOMAIN_MAX + 1] = "";
    int rc = domain_arg ? queue_domain_arg(domain_arg, domain, sizeof domain)
                        : EX_OK;
    if (rc == EX_OK)
        rc = ctl_prepare(c);
    bool exists;
    if (rc == EX_OK)
        rc = open_queue_for_reading(c, &exists);
    if (rc != EX_OK)
        return rc;
    struct listing l = {c, domain, 0, 0, EX_OK};
    if (exists && domain_arg)
        list_domain(&l, domain);
    else if (exists && queue_domains(&c->q, list_domain, &l) < 0)
        l.rc = queue_read_error(c, NULL);
    /* A mistyped domain (or subcommand) should not read as "empty". */
    char owner[ACCOUNT_NAME_MAX + 1];
    if (domain_arg && l.messages == 0 && l.rc == EX_OK &&
        accounts_domain_owner(c->conf.accounts_db, domain, owner, sizeof owner) ==
            ACCT_NOTFOUND)
        return fail(EX_NOUSER, "%s: not a hosted domain, and nothing is queued "
                    "for it (subcommands: summary, delete, bounce)", domain);
    /* "Queue is empty" would be a lie when the queue could not be read. */
    if (l.messages > 0 || l.rc == EX_OK)
        print_list_total(&l, domain_arg ? domain : NULL);
    return l.rc;
}

/* ========================================================= queue: summary */

struct oldest {
    struct ctl *c;
    const char *domain;
    time_t arrival;
    bool found;
    int rc;
};

/* Ids sort by creation time, so the first envelope that loads is the
 * oldest; stop there. */
static int find_oldest(void *ctx, const char *id)
{
    struct oldest *o = ctx;
    struct envelope e;
    if (!load_envelope(o->c, o->domain, id, &e, &o->rc))
        return 0;
    o->arrival = e.arrival;
    o->found = true;
    envelope_free(&e);
    return 1;
}

static void format_age(time_t since, char *buf, size_t n)
{
    long s = (long)(time(NULL) - since);
    if (s < 0)
        s = 0;
    if (s < 60)
        snprintf(buf, n, "%lds", s);
    else if (s < 3600)
        snprintf(buf, n, "%ldm", s / 60);
    else if (s < 86400)
        snprintf(buf, n, "%ldh", s / 3600);
    else
        snprintf(buf, n, "%ldd", s / 86400);
}

struct summary {
    struct ctl *c;
    int rc;
};

/* Format of "odmrctl queue summary": a header, then one line per domain
 * with mail queued, sorted by domain:
 *
 * DOMAIN                           MESSAGES        BYTES OLDEST
 * example.org                             3        12345 2h
 *
 * OLDEST is the age of the oldest message: Ns, Nm, Nh or Nd. */
static int summary_domain(void *ctx, const char *domain)
{
    struct summary *s = ctx;
    uint64_t bytes;
    unsigned long count;
    if (!queue_usage_exact(&s->c->q, domain, &bytes, &count)) {
        s->rc = queue_read_error(s->c, domain);
        return 0;
    }
    if (count == 0)
        return 0;
    struct oldest o = {s->c, domain, 0, false, EX_OK};
    char age[32] = "-";
    if (queue_ids(&s->c->q, domain, find_oldest, &o) >= 0 && o.found)
        format_age(o.arrival, age, sizeof age);
    if (o.rc != EX_OK)
        s->rc = o.rc;
    char shown[4 * IDNA_KEY_MAX + 1];
    printf("%-32s %8lu %12" PRIu64 " %s\n",
           readable_domain(domain, shown, sizeof shown), count, bytes, age);
    return 0;
}

static int queue_summary(struct ctl *c)
{
    bool exists;
    int rc = ctl_prepare(c);
    if (rc == EX_OK)
        rc = open_queue_for_reading(c, &exists);
    if (rc != EX_OK)
        return rc;
    struct summary s = {c, EX_OK};
    printf("%-32s %8s %12s %s\n", "DOMAIN", "MESSAGES", "BYTES", "OLDEST");
    if (exists && queue_domains(&c->q, summary_domain, &s) < 0)
        s.rc = queue_read_error(c, NULL);
    return s.rc;
}

/* ========================================================== queue: delete */

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Takes the domain's dequeue lock so that a message is never removed under
 * a session that is delivering it (which could then rewrite its envelope
 * and bring it back).  Returns the lock fd, or -1 after reporting. */
static int lock_domain(struct ctl *c, const char *domain, int *rc)
{
    for (long waited = 0;; waited += DOMAIN_LOCK_STEP_MS) {
        int fd = queue_lock_domain(&c->q, domain);
        if (fd >= 0)
            return fd;
        if (fd == -1) {
            *rc = fail(access_status(errno),
                       "cannot lock the queue of %s: %s", domain, strerror(errno));
            return -1;
        }
        if (waited >= DOMAIN_LOCK_WAIT_MS) {
            *rc = fail(EX_TEMPFAIL, "mail for %s is being delivered right now, "
                       "try again later", domain);
            return -1;
        }
        sleep_ms(DOMAIN_LOCK_STEP_MS);
    }
}

/* Removes one message from one domain's queue (the lock is held). */
static int remove_message(struct ctl *c, const char *domain, const char *id)
{
    if (queue_remove(&c->q, domain, id)) {
        log_info("%s: removed from the queue of %s by odmrctl (uid %lu)", id,
                 domain, (unsigned long)c->caller);
        return EX_OK;
    }
    if (errno == ENOENT)   /* delivered meanwhile: it is gone either way */
        return EX_OK;
    int code = access_status(errno);
    return fail(code, "%s: cannot remove from the queue of %s: %s", id, domain,
                strerror(errno));
}

static bool queue_id_valid(const char *id)
{
    size_t len = strnlen(id, QID_MAX);
    if (len == 0 || len >= QID_MAX)
        return false;
    for (; *id; id++)
        if (!isalnum((unsigned char)*id))
            return false;
    return true;
}

/* The domains holding a copy of id (a message for two hosted domains is
 * held once in each); false after reporting an error in *rc. */
static bool find_copies(struct ctl *c, const char *id, struct strlist *domains,
                        int *rc)
{
    memset(domains, 0, sizeof *domains);
    if (queue_find(&c->q, id, collect_string, domains) < 0 || domains->failed) {
        strlist_free(domains);
        *rc = queue_read_error(c, NULL);
        return false;
    }
    return true;
}

/* queue delete: removes every copy of id, each under its domain's lock.
 * *unknown is set when no domain holds it. */
static int delete_copies(struct ctl *c, const char *id, bool *unknown)
{
    struct strlist domains;
    int rc = EX_OK;
    if (!find_copies(c, id, &domains, &rc))
        return rc;
    *unknown = domains.n == 0;
    for (size_t i = 0; i < domains.n; i++) {
        int one = EX_OK;
        int fd = lock_domain(c, domains.v[i], &one);
        if (fd >= 0) {
            one = remove_message(c, domains.v[i], id);
            close(fd);
        }
        if (one != EX_OK)
            rc = one;
    }
    strlist_free(&domains);
    return rc;
}

/* What queue delete / queue bounce do to one message. */
typedef int (*id_action)(struct ctl *c, const char *id, bool *unknown);

/* queue delete ID... and queue bounce ID...: act on every id; unknown ids
 * are reported and make the exit status 65 at the end. */
static int act_on_ids(struct ctl *c, int argc, char **argv, id_action act)
{
    bool exists;
    int rc = ctl_prepare(c);
    if (rc == EX_OK)
        rc = open_queue_for_reading(c, &exists);
    if (rc != EX_OK)
        return rc;
    bool any_unknown = false;
    for (int i = 0; i < argc; i++) {
        bool unknown = !exists || !queue_id_valid(argv[i]);
        if (!unknown) {
            int one = act(c, argv[i], &unknown);
            if (one != EX_OK)
                rc = one;
        }
        if (unknown) {
            fail(0, "%s: no such message in the queue", argv[i]);
            any_unknown = true;
        }
    }
    /* A system error says more than an unknown id. */
    return rc != EX_OK ? rc : any_unknown ? EX_DATAERR : EX_OK;
}

static int delete_domain(struct ctl *c, const char *domain_arg)
{
    char domain[ADDR_DOMAIN_MAX + 1];
    bool exists;
    int rc = queue_domain_arg(domain_arg, domain, sizeof domain);
    if (rc == EX_OK)
        rc = ctl_prepare(c);
    if (rc == EX_OK)
        rc = open_queue_for_reading(c, &exists);
    if (rc != EX_OK || !exists)
        return rc;
    struct strlist ids = {0};
    /* Listing first avoids creating the directory of an unknown domain
     * (the lock file lives there). */
    if (queue_ids(&c->q, domain, collect_string, &ids) < 0 || ids.failed) {
        strlist_free(&ids);
        return queue_read_error(c, domain);
    }
    if (ids.n > 0) {
        int fd = lock_domain(c, domain, &rc);
        for (size_t i = 0; fd >= 0 && i < ids.n; i++) {
            int one = remove_message(c, domain, ids.v[i]);
            if (one != EX_OK)
                rc = one;
        }
        if (fd >= 0)
            close(fd);
    }
    strlist_free(&ids);
    return rc;
}

/* ========================================================== queue: bounce */

/* One line on stdout per returned message, saying where the report went.
 * domains: the queues it was removed from, "a, b". */
static void print_bounce_result(const struct envelope *e, const char *domains,
                                enum bounce_result res)
{
    char sender[ADDR_MAX + 1], key[IDNA_KEY_MAX + 1] = "";
    const char *sd = addr_domain_of(e->sender);
    printable(e->sender, sender, sizeof sender);
    if (sd && idna_domain_key(sd, key, sizeof key, NULL) != IDNA_OK)
        addr_domain_key(sd, key, sizeof key);
    switch (res) {
    case BOUNCE_SENT:
        printf("%s: returned to <%s> via the bounce relay\n", e->id, sender);
        break;
    case BOUNCE_QUEUED:
        printf("%s: returned to <%s>, the report is queued for %s\n", e->id,
               sender, key);
        break;
    case BOUNCE_NOT_NEEDED:
        printf("%s: removed from %s without a report (%s)\n", e->id, domains,
               e->sender[0] ? "no recipient asked for one" : "null sender");
        break;
    case BOUNCE_LOGGED:
        printf("%s: removed from %s; the report to <%s> could not be "
               "delivered (see the mail log)\n", e->id, domains, sender);
        break;
    case BOUNCE_RETRY:
        break;
    }
}

/* The copies of one message being returned, each locked and loaded. */
struct copies {
    size_t n;
    int *lock;
    struct envelope *env;
    size_t nrcpt;             /* over all copies */
};

static void copies_free(struct copies *k)
{
    for (size_t i = 0; i < k->n; i++) {
        close(k->lock[i]);
        envelope_free(&k->env[i]);
    }
    free(k->lock);
    free(k->env);
    memset(k, 0, sizeof *k);
}

/* Locks and loads every copy listed in domains; copies gone meanwhile
 * are left out.  False (k empty) after reporting an error in *rc. */
static bool copies_load(struct ctl *c, const char *id,
                        const struct strlist *domains, struct copies *k, int *rc)
{
    memset(k, 0, sizeof *k);
    k->lock = calloc(domains->n + 1, sizeof *k->lock);
    k->env = calloc(domains->n + 1, sizeof *k->env);
    if (!k->lock || !k->env) {
        copies_free(k);
        *rc = fail(EX_TEMPFAIL, "out of memory");
        return false;
    }
    for (size_t i = 0; i < domains->n; i++) {
        int fd = lock_domain(c, domains->v[i], rc);
        if (fd < 0) {
            copies_free(k);
            return false;
        }
        if (!load_envelope(c, domains->v[i], id, &k->env[k->n], rc)) {
            close(fd);
            if (*rc == EX_OK)
                continue;   /* delivered meanwhile */
            copies_free(k);
            return false;
        }
        k->lock[k->n] = fd;
        k->nrcpt += k->env[k->n].nrcpt;
        k->n++;
    }
    return true;
}

/* Every recipient of every copy, with status 5.0.0. */
static struct bounce_rcpt *copies_rcpts(const struct copies *k)
{
    static const char diag[] = "returned to sender by the administrator";
    struct bounce_rcpt *r = calloc(k->nrcpt ? k->nrcpt : 1, sizeof *r);
    size_t n = 0;
    for (size_t i = 0; r && i < k->n; i++)
        for (size_t j = 0; j < k->env[i].nrcpt; j++) {
            const struct env_rcpt *er = &k->env[i].rcpt[j];
            r[n++] = (struct bounce_rcpt){er->addr, er->orcpt, er->notify,
                                          BOUNCE_STATUS_ADMIN, diag};
        }
    return r;
}

/* queue bounce: returns a message to its sender with status 5.0.0, one
 * report for all its copies, then removes them (their locks held). */
static int bounce_copies(struct ctl *c, const char *id, bool *unknown)
{
    struct strlist domains;
    struct copies k;
    int rc = EX_OK;
    if (!find_copies(c, id, &domains, &rc))
        return rc;
    *unknown = domains.n == 0;
    if (!copies_load(c, id, &domains, &k, &rc) || k.n == 0) {
        copies_free(&k);   /* empty after a failure; no copies left */
        strlist_free(&domains);
        return rc;
    }
    struct bounce_rcpt *r = copies_rcpts(&k);
    char names[1024] = "";
    for (size_t i = 0; i < k.n; i++)
        str_fmt(names + strlen(names), sizeof names - strlen(names), "%s%s",
                i ? ", " : "", k.env[i].domain);
    int fd = queue_open_data(&c->q, k.env[0].domain, id);
    enum bounce_result res = r ? bounce_message(&c->conf, &c->q, &k.env[0], fd,
                                                r, k.nrcpt)
                               : BOUNCE_RETRY;
    if (fd >= 0)
        close(fd);
    free(r);
    if (res == BOUNCE_RETRY) {
        rc = fail(EX_TEMPFAIL, "%s: the report to <%s> cannot be queued now; "
                  "the message stays queued, try again later", id, k.env[0].sender);
    } else {
        print_bounce_result(&k.env[0], names, res);
        log_info("%s: returned to sender by odmrctl (uid %lu)", id,
                 (unsigned long)c->caller);
        for (size_t i = 0; i < k.n; i++) {
            int one = remove_message(c, k.env[i].domain, id);
            if (one != EX_OK)
                rc = one;
        }
    }
    copies_free(&k);
    strlist_free(&domains);
    return rc;
}

static int cmd_queue(struct ctl *c, int argc, char **argv)
{
    static const char usage[] =
        "queue [DOMAIN] | queue summary | queue delete ID... | "
        "queue delete --domain DOMAIN | queue bounce ID...";
    if (argc == 0)
        return queue_list(c, NULL);
    const char *sub = argv[0];
    if (!strcmp(sub, "summary"))
        return argc == 1 ? queue_summary(c) : usage_error(usage);
    if (!strcmp(sub, "bounce"))
        return argc >= 2 ? act_on_ids(c, argc - 1, argv + 1, bounce_copies)
                         : usage_error(usage);
    if (!strcmp(sub, "delete")) {
        if (argc == 3 && !strcmp(argv[1], "--domain"))
            return delete_domain(c, argv[2]);
        if (argc < 2 || !strcmp(argv[1], "--domain"))
            return usage_error(usage);
        return act_on_ids(c, argc - 1, argv + 1, delete_copies);
    }
    if (argc == 1 && sub[0] != '-')
        return queue_list(c, sub);
    return usage_error(usage);
}

/* =============================================================== enqueue */

/* The message's envelopes: one per recipient domain. */
struct submission {
    char sender[ADDR_MAX + 1];
    bool utf8;                 /* some address needs SMTPUTF8 */
    struct envelope **envs;
    size_t nenv;
    size_t nrcpt;
};

static void submission_free(struct submission *s)
{
    for (size_t i = 0; i < s->nenv; i++) {
        envelope_free(s->envs[i]);
        free(s->envs[i]);
    }
    free(s->envs);
    s->envs = NULL;
    s->nenv = 0;
}

static bool has_non_ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return true;
    return false;
}

static int parse_sender(const char *arg, struct submission *s)
{
    struct mailbox mb;
    const char *end;
    if (!arg[0] || !strcmp(arg, "<>")) {
        s->sender[0] = '\0';
        return EX_OK;
    }
    enum addr_result r = addr_parse_path(arg, &end, &mb, ADDR_ALLOW_NULL |
                                         ADDR_ALLOW_BARE | ADDR_ALLOW_UTF8);
    if (r != ADDR_OK || *end != '\0' || !addr_format(&mb, s->sender,
                                                     sizeof s->sender))
        return fail(EX_DATAERR, "invalid sender address \"%s\"%s", arg,
                    r == ADDR_TOOLONG ? " (too long)" : "");
    s->utf8 |= has_non_ascii(s->sender);
    return EX_OK;
}

/* The envelope for the domain key, created when new. */
static struct envelope *envelope_for(struct submission *s, const char *key)
{
    for (size_t i = 0; i < s->nenv; i++)
        if (!strcmp(s->envs[i]->domain, key))
            return s->envs[i];
    struct envelope **more = realloc(s->envs, (s->nenv + 1) * sizeof *more);
    if (!more)
        return NULL;
    s->envs = more;
    struct envelope *e = malloc(sizeof *e);
    if (!e)
        return NULL;
    envelope_init(e);
    str_copy(e->domain, key, sizeof e->domain);
    str_copy(e->sender, s->sender, sizeof e->sender);
    str_copy(e->client, "localhost", sizeof e->client);
    e->body = BODY_UNSPEC;
    e->ret = RET_UNSPEC;
    s->envs[s->nenv++] = e;
    return e;
}

/* Same mailbox: local parts compare exactly, domains without case. */
static bool same_address(const char *a, const char *b)
{
    const char *da = addr_domain_of(a), *db = addr_domain_of(b);
    if (!da || !db || da - a != db - b)
        return false;
    return !strncmp(a, b, (size_t)(da - a)) && !strcasecmp(da, db);
}

static bool already_listed(const struct envelope *e, const char *addr)
{
    for (size_t i = 0; i < e->nrcpt; i++)
        if (same_address(e->rcpt[i].addr, addr))
            return true;
    return false;
}

static int add_recipient(struct ctl *c, struct submission *s, const char *arg)
{
    struct mailbox mb;
    const char *end;
    char addr[ADDR_MAX + 1], key[ADDR_DOMAIN_MAX + 1];
    enum addr_result r = addr_parse_path(arg, &end, &mb, ADDR_ALLOW_BARE |
                                         ADDR_ALLOW_UTF8);
    if (r != ADDR_OK || *end != '\0' || mb.null ||
        !addr_format(&mb, addr, sizeof addr))
        return fail(EX_DATAERR, "invalid recipient address \"%s\"%s", arg,
                    r == ADDR_TOOLONG ? " (too long)" : "");
    if (mb.literal)
        return fail(EX_NOUSER, "%s: address literals are not hosted here", arg);
    const char *why = NULL;
    if (idna_domain_key(mb.domain, key, sizeof key, &why) != IDNA_OK)
        return fail(EX_DATAERR, "invalid recipient address \"%s\": invalid "
                    "domain (%s)", arg, why);
    struct envelope *e = envelope_for(s, key);
    if (!e)
        return fail(EX_TEMPFAIL, "out of memory");
    if (already_listed(e, addr))
        return EX_OK;
    if (s->nrcpt >= c->conf.max_recipients)
        return fail(EX_DATAERR, "too many recipients (max_recipients is %lu)",
                    c->conf.max_recipients);
    if (!envelope_add_rcpt(e, addr, 0, "", c->conf.max_recipients))
        return fail(EX_TEMPFAIL, "out of memory");
    s->nrcpt++;
    s->utf8 |= has_non_ascii(addr);
    return EX_OK;
}

/* Every recipient domain must be bound to an account: odmrd would refuse
 * the mail with 550 5.7.1 over SMTP, and nothing could ever dequeue it. */
static int check_hosted(struct ctl *c, const struct submission *s)
{
    for (size_t i = 0; i < s->nenv; i++) {
        const struct envelope *e = s->envs[i];
        enum acct_result r = accounts_domain_owner(c->conf.accounts_db,
                                                   e->domain, NULL, 0);
        if (r == ACCT_NOTFOUND || r == ACCT_NODB)
            return fail(EX_NOUSER, "%s: domain %s is not hosted here",
                        e->nrcpt ? e->rcpt[0].addr : e->domain, e->domain);
        if (r != ACCT_OK)
            return acct_status(c, r);
    }
    return EX_OK;
}

/* Streaming copy of stdin into the queue: line ends become CRLF (a lone CR
 * too), the last line gets one if it lacks it, Received: headers are
 * counted, and the size limit is enforced as the data arrives, so memory
 * use does not depend on the message size. */
struct reader {
    struct queue_in *in;
    uint64_t limit;            /* max_message_size, 0 = none */
    uint64_t bytes;            /* message bytes as stored */
    bool pending_cr;           /* last input byte was CR */
    bool mid_line;             /* bytes written since the last CRLF */
    bool in_headers;
    size_t line_len;           /* bytes of the current header line so far */
    char prefix[RECEIVED_PREFIX_LEN];
    unsigned received;
    size_t olen;
    char out[2 * ENQUEUE_CHUNK + 2];
};

static void emit_byte(struct reader *r, char ch)
{
    r->out[r->olen++] = ch;
    r->mid_line = true;
    if (!r->in_headers)
        return;
    if (r->line_len < RECEIVED_PREFIX_LEN)
        r->prefix[r->line_len] = ch;
    if (++r->line_len == RECEIVED_PREFIX_LEN &&
        !strncasecmp(r->prefix, RECEIVED_PREFIX, RECEIVED_PREFIX_LEN))
        r->received++;
}

static void emit_eol(struct reader *r)
{
    r->out[r->olen++] = '\r';
    r->out[r->olen++] = '\n';
    /* The first empty line ends the header section. */
    if (r->in_headers && r->line_len == 0)
        r->in_headers = false;
    r->line_len = 0;
    r->mid_line = false;
}

static void convert_chunk(struct reader *r, const char *data, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char ch = data[i];
        if (r->pending_cr) {
            r->pending_cr = false;
            emit_eol(r);
            if (ch == '\n')
                continue;
        }
        if (ch == '\r')
            r->pending_cr = true;
        else if (ch == '\n')
            emit_eol(r);
        else
            emit_byte(r, ch);
    }
}

/* Hands the converted bytes to the queue and checks the limits. */
static int flush_output(struct reader *r)
{
    queue_in_write(r->in, r->out, r->olen);
    r->bytes += r->olen;
    r->olen = 0;
    if (r->in->error)
        return fail(errno_status(r->in->error), "cannot write to the queue: %s",
                    strerror(r->in->error));
    if (r->limit && r->bytes > r->limit)
        return fail(EX_DATAERR, "message too large (max_message_size is %"
                    PRIu64 " bytes)", r->limit);
    if (r->received > MAX_RECEIVED_HEADERS)
        return fail(EX_DATAERR, "more than %d Received: headers, mail loop",
                    MAX_RECEIVED_HEADERS);
    return EX_OK;
}

static int copy_stdin(struct reader *r)
{
    static char chunk[ENQUEUE_CHUNK];
    for (;;) {
        ssize_t got = read(STDIN_FILENO, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return fail(EX_TEMPFAIL, "cannot read the message: %s",
                        strerror(errno));
        if (got == 0)
            break;
        /* RFC 5321 and RFC 2045 2.8 allow no NUL in mail data, and a later
         * hop that strips it could end the data early (smuggling). */
        if (memchr(chunk, '\0', (size_t)got))
            return fail(EX_DATAERR, "the message contains a NUL character "
                        "(not accepted)");
        convert_chunk(r, chunk, (size_t)got);
        int rc = flush_output(r);
        if (rc != EX_OK)
            return rc;
    }
    if (r->pending_cr || r->mid_line)
        emit_eol(r);
    r->pending_cr = false;
    return flush_output(r);
}

static void write_received(struct ctl *c, struct queue_in *in)
{
    char date[64], header[512];
    rfc5322_date(time(NULL), date, sizeof date);
    snprintf(header, sizeof header,
             "Received: by %s (odmrctl, from uid %lu)\r\n\tid %s; %s\r\n",
             c->conf.hostname, (unsigned long)c->caller, in->id, date);
    queue_in_write(in, header, strlen(header));
}

/* domain_quota: what is queued plus this message must fit. */
static int check_quota(struct ctl *c, const struct submission *s, uint64_t size)
{
    uint64_t quota = c->conf.domain_quota;
    for (size_t i = 0; quota && i < s->nenv; i++) {
        uint64_t bytes;
        unsigned long count;
        const char *d = s->envs[i]->domain;
        if (!queue_usage(&c->q, d, &bytes, &count))
            return queue_read_error(c, d);
        if (bytes + size > quota)
            return fail(EX_TEMPFAIL, "domain %s is over its quota: %" PRIu64
                        " bytes queued, this message %" PRIu64 ", domain_quota %"
                        PRIu64, d, bytes, size, quota);
    }
    return EX_OK;
}

static int queue_message(struct ctl *c, struct submission *s)
{
    static struct queue_in in;
    static struct reader r;
    char err[PATH_MAX + 64];
    if (!queue_open(&c->q, c->conf.spool_dir, err, sizeof err))
        return fail(errno_status(errno), "%s", err);
    if (!queue_in_begin(&c->q, &in))
        return fail(errno_status(errno), "cannot create a file in %s/tmp: %s",
                    c->conf.spool_dir, strerror(errno));
    write_received(c, &in);
    memset(&r, 0, offsetof(struct reader, out));
    r.in = &in;
    r.limit = c->conf.max_message_size;
    r.in_headers = true;
    int rc = copy_stdin(&r);
    if (rc == EX_OK)
        rc = check_quota(c, s, in.size);
    if (rc != EX_OK) {
        queue_in_abort(&in);
        return rc;
    }
    for (size_t i = 0; i < s->nenv; i++)
        s->envs[i]->smtputf8 = s->utf8;
    int e = queue_in_commit(&c->q, &in, s->envs, s->nenv);
    if (e)
        return fail(errno_status(e), "cannot queue the message: %s", strerror(e));
    log_info("%s: from=<%s>, size=%" PRIu64 ", nrcpt=%zu (queued by odmrctl "
             "uid %lu)", in.id, s->sender, in.size, s->nrcpt,
             (unsigned long)c->caller);
    return EX_OK;
}

static int cmd_enqueue(struct ctl *c, int argc, char **argv)
{
    static const char usage[] = "enqueue [-f SENDER] [--] RCPT...";
    const char *sender = "";
    int i = 0;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (!strcmp(argv[i], "-f") && i + 1 < argc)
            sender = argv[++i];
        else if (!strncmp(argv[i], "-f", 2) && argv[i][2])
            sender = argv[i] + 2;
        else
            return usage_error(usage);
    }
    if (i >= argc)
        return usage_error(usage);
    int rc = ctl_prepare(c);
    if (rc != EX_OK)
        return rc;
    struct submission s;
    memset(&s, 0, sizeof s);
    rc = parse_sender(sender, &s);
    for (; rc == EX_OK && i < argc; i++)
        rc = add_recipient(c, &s, argv[i]);
    if (rc == EX_OK)
        rc = check_hosted(c, &s);
    if (rc == EX_OK)
        rc = queue_message(c, &s);
    submission_free(&s);
    return rc;
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
        "  domain del DOMAIN        unbind DOMAIN\n"
        "  domain list              \"DOMAIN ACCOUNT\" lines\n"
        "  queue [DOMAIN]           list queued messages\n"
        "  queue summary            messages, bytes and oldest age per domain\n"
        "  queue delete ID...       remove messages without notice\n"
        "  queue delete --domain D  remove every message queued for D\n"
        "  queue bounce ID...       return messages to their senders now, with a\n"
        "                           delivery status notification\n"
        "  enqueue [-f SENDER] [--] RCPT...\n"
        "                           queue the message read from stdin\n"
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
    rc = cmd->run(&ctl, argc - i - 1, argv + i + 1);
    return finish(rc);
}
