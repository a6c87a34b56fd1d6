/* odmrctl_accounts.c - odmrctl user and domain commands (SPEC 3.3): the
 * accounts and their domain bindings in the account database.  Deleting a
 * binding deletes the domain's recipient list too (odmrctl_recipients.c). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <termios.h>
#include <unistd.h>

#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"
#include "odmrctl.h"

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
    bool too_long = false, control = false, held_cr = false;
    for (;;) {
        char ch;
        ssize_t got = read(STDIN_FILENO, &ch, 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            explicit_bzero(pw, n);
            return fail(EX_TEMPFAIL, "cannot read the password: %s",
                        strerror(errno));
        }
        if (got == 0 || ch == '\n')
            break;
        /* a CR right after a password of the full length may still be
         * the line's CRLF */
        too_long |= held_cr;
        held_cr = false;
        if (len + 1 < n)
            pw[len++] = ch;
        else if (ch == '\r')
            held_cr = true;
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

/* The recipient lists of name's domains go first: removed with the
 * bindings, they cannot come back when a domain is bound again, and a
 * failure leaves the account there to delete again. */
static int drop_lists_of(struct ctl *c, const char *name)
{
    struct bindings b = {{0}, {0}};
    enum acct_result r = accounts_domains(c->conf.accounts_db, collect_binding,
                                          &b);
    int rc = EX_OK;
    if (b.domains.failed || b.names.failed || b.domains.n != b.names.n)
        rc = fail(EX_TEMPFAIL, "out of memory");
    else if (r != ACCT_OK && r != ACCT_NODB)
        rc = acct_status(c, r);
    for (size_t i = 0; rc == EX_OK && i < b.domains.n; i++)
        if (!strcmp(b.names.v[i], name))
            rc = drop_recipient_list(c, b.domains.v[i]);
    strlist_free(&b.domains);
    strlist_free(&b.names);
    return rc;
}

static int user_del(struct ctl *c, const char *name)
{
    int rc = drop_lists_of(c, name);
    if (rc != EX_OK)
        return rc;
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

int cmd_user(struct ctl *c, int argc, char **argv)
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
    /* The list first, for the reasons drop_lists_of() gives. */
    int rc = drop_recipient_list(c, domain);
    if (rc != EX_OK)
        return rc;
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

int cmd_domain(struct ctl *c, int argc, char **argv)
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

