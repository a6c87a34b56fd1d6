/* odmrctl_recipients.c - odmrctl recipient add|del|list|import (SPEC 6):
 * the optional per-domain list of valid recipients (server/recipients.h).
 * A domain with a list refuses every other recipient at RCPT with 550
 * 5.1.1; a domain without one accepts every recipient.
 *
 * What is stored is what odmrd's RCPT looks up: the local part as written
 * (quotes kept; recipients.c folds ASCII case), or RECIPIENT_CATCHALL.
 * An ADDR is "user@DOMAIN" (DOMAIN in either IDNA spelling), a bare
 * "user", or "@DOMAIN" / "@" for the catch-all.  Refused (exit 65): an
 * address of another domain, bad syntax, and local parts that RCPT never
 * looks up - sender-specified routing ('%', '!', a quoted '@': refused
 * with 550 5.7.1 before any list is asked) and spaces or control
 * characters (which a quoted local part can have, and a list cannot).
 *
 * Output: add, del and import print one line,
 *   example.org: 3 added (5 in the list)
 *   example.org: 1 removed (no list left: every address is accepted)
 * and list prints one address a line, "user@domain", the catch-all as
 * "@domain", the domain in its readable form (U-labels). */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"
#include "odmrctl.h"
#include "recipients.h"

/* recipient import stores this many entries per database transaction. */
#define IMPORT_BATCH 10000
#define SHOWN_MAX (4 * IDNA_KEY_MAX + 1)

/* The DOMAIN argument: its key and its readable form. */
struct rdomain {
    char key[IDNA_KEY_MAX + 1];
    char shown[SHOWN_MAX];
};

static int domain_arg(const char *arg, struct rdomain *d)
{
    int rc = check_domain(arg);
    if (rc != EX_OK)
        return rc;
    idna_domain_key(arg, d->key, sizeof d->key, NULL);
    readable_domain(d->key, d->shown, sizeof d->shown);
    return EX_OK;
}

static bool same_domain(const struct rdomain *d, const char *domain)
{
    char key[IDNA_KEY_MAX + 1];
    return idna_domain_key(domain, key, sizeof key, NULL) == IDNA_OK &&
           !strcmp(key, d->key);
}

/* Why RCPT would never look local up in a list, or NULL. */
static const char *unlistable(const char *local)
{
    if (strpbrk(local, "%!") || (local[0] == '"' && strchr(local, '@')))
        return "sender-specified routing, which RCPT refuses with 550 5.7.1 "
               "before any list is asked";
    for (const char *p = local; *p; p++)
        if ((unsigned char)*p < 0x21 || *p == 0x7f)
            return "a local part with spaces or control characters cannot "
                   "be listed";
    return NULL;
}

static bool refuse(char *why, size_t wn, const char *reason)
{
    str_copy(why, reason, wn);
    return false;
}

/* The entry for one ADDR into local (ADDR_LOCAL_MAX + 1 bytes); false
 * with the reason in why. */
static bool parse_entry(const struct rdomain *d, const char *arg, char *local,
                        char *why, size_t wn)
{
    char path[ADDR_MAX + 2], other[SHOWN_MAX + 32];
    snprintf(other, sizeof other, "not an address of %s", d->shown);
    if (arg[0] == '@') {
        if (arg[1] && !same_domain(d, arg + 1))
            return refuse(why, wn, other);
        str_copy(local, RECIPIENT_CATCHALL, ADDR_LOCAL_MAX + 1);
        return true;
    }
    const char *addr = arg, *at = strrchr(arg, '@'), *quote = strrchr(arg, '"');
    if (!at || (quote && quote > at)) {   /* a bare local part */
        if (!str_fmt(path, sizeof path, "%s@%s", arg, d->key))
            return refuse(why, wn, "too long");
        addr = path;
    }
    struct mailbox mb;
    const char *end;
    enum addr_result r = addr_parse_path(addr, &end, &mb,
                                         ADDR_ALLOW_BARE | ADDR_ALLOW_UTF8);
    if (r != ADDR_OK || *end || mb.null)
        return refuse(why, wn, r == ADDR_TOOLONG ? "too long"
                                                 : "not a valid address");
    if (mb.literal || !same_domain(d, mb.domain))
        return refuse(why, wn, other);
    const char *problem = unlistable(mb.local);
    if (problem)
        return refuse(why, wn, problem);
    str_copy(local, mb.local, ADDR_LOCAL_MAX + 1);
    return true;
}

/* Parses text and adds its entry to l; false after reporting it, the
 * report starting with where ("FILE:LINE: ") when given. */
static bool add_entry(const struct rdomain *d, const char *text,
                      const char *where, struct strlist *l)
{
    char local[ADDR_LOCAL_MAX + 1], why[SHOWN_MAX + 64], shown[ADDR_MAX + 2];
    if (parse_entry(d, text, local, why, sizeof why)) {
        strlist_add(l, local);
        return true;
    }
    fail(0, "%sinvalid recipient \"%s\": %s", where ? where : "",
         printable(text, shown, sizeof shown), why);
    return false;
}

/* ------------------------------------------------------------- storing */

/* Lists belong to hosted domains only. */
static int check_hosted(struct ctl *c, const struct rdomain *d)
{
    enum acct_result r = accounts_domain_owner(c->conf.accounts_db, d->key,
                                               NULL, 0);
    if (r == ACCT_NOTFOUND || r == ACCT_NODB)
        return fail(EX_NOUSER, "domain %s is not hosted here (odmrctl domain "
                    "add binds it to an account)", d->shown);
    return acct_status(c, r);
}

/* A failed batch; done entries were stored before it. */
static int change_error(struct ctl *c, const struct rdomain *d,
                        enum acct_result r, bool add, size_t done)
{
    int rc;
    if (r == ACCT_NOTFOUND || r == ACCT_NODB)
        rc = fail(EX_NOUSER, "domain %s is not hosted here, or its binding was "
                  "stored by an older odmr (domain del and domain add it "
                  "again)", d->shown);
    else
        rc = acct_status(c, r);
    unsigned long n;
    bool held = add && done > 0 && r == ACCT_TEMPFAIL &&
                recipients_count(c->conf.accounts_db, d->key, &n) == ACCT_NOTFOUND;
    if (held)
        /* held batches of a new list: stored, refusing nobody yet */
        fail(0, "%s: %zu entries were stored before the failure but the list "
             "is not on: run the command again to switch it on (a recipient "
             "add would switch it on with only these)", d->shown, done);
    else if (done > 0)
        fail(0, "%s: %zu entries were changed before the failure; run the "
             "command again", d->shown, done);
    return rc;
}

static void print_result(struct ctl *c, const struct rdomain *d,
                         const char *verb, size_t changed)
{
    unsigned long n = 0;
    enum acct_result r = recipients_count(c->conf.accounts_db, d->key, &n);
    if (r == ACCT_OK)
        printf("%s: %zu %s (%lu in the list)\n", d->shown, changed, verb, n);
    else if (r == ACCT_NOTFOUND)
        printf("%s: %zu %s (no list%s: every address is accepted)\n", d->shown,
               changed, verb, changed && verb[0] == 'r' ? " left" : "");
    else
        printf("%s: %zu %s\n", d->shown, changed, verb);
}

/* Adds or removes the entries of l, IMPORT_BATCH per transaction.  A new
 * list is switched on by the last batch only (recipients_change's hold):
 * otherwise the addresses of the later batches would be refused while the
 * import runs, or for good after a failure half way. */
static int apply(struct ctl *c, const struct rdomain *d,
                 const struct strlist *l, bool add)
{
    if (l->failed)
        return fail(EX_TEMPFAIL, "out of memory");
    int rc = ctl_prepare(c);
    if (rc == EX_OK)
        rc = check_hosted(c, d);
    size_t total = 0;
    for (size_t i = 0; rc == EX_OK && i < l->n; i += IMPORT_BATCH) {
        size_t n = l->n - i < IMPORT_BATCH ? l->n - i : IMPORT_BATCH, one = 0;
        enum acct_result r = recipients_change(
            c->conf.accounts_db, d->key, (const char *const *)l->v + i, n,
            add, i + n < l->n, &one);
        total += one;
        if (r != ACCT_OK)
            rc = change_error(c, d, r, add, total);
    }
    if (total > 0)
        log_info("recipient list of %s: %zu %s by uid %lu", d->key, total,
                 add ? "added" : "removed", (unsigned long)c->caller);
    if (rc == EX_OK)
        print_result(c, d, add ? "added" : "removed", total);
    return rc;
}

/* recipient add|del DOMAIN ADDR...: every bad ADDR is reported and then
 * nothing is changed. */
static int change_args(struct ctl *c, const char *darg, int argc, char **argv,
                       bool add)
{
    struct rdomain d;
    int rc = domain_arg(darg, &d);
    if (rc != EX_OK)
        return rc;
    struct strlist l = {0};
    for (int i = 0; i < argc; i++)
        if (!add_entry(&d, argv[i], NULL, &l))
            rc = EX_DATAERR;
    if (rc == EX_OK)
        rc = apply(c, &d, &l, add);
    strlist_free(&l);
    return rc;
}

/* -------------------------------------------------------------- import */

/* One line of an import file (without its line end): blank lines and
 * "#" comments are skipped, blanks around an address ignored.  False
 * after reporting a bad line. */
static bool import_line(const struct rdomain *d, const char *name,
                        unsigned long lineno, char *line, size_t len,
                        struct strlist *l)
{
    char where[PATH_MAX + 32];
    snprintf(where, sizeof where, "%s:%lu: ", name, lineno);
    if (memchr(line, '\0', len)) {
        fail(0, "%sthe line contains a NUL byte", where);
        return false;
    }
    while (len > 0 && (line[len - 1] == ' ' || line[len - 1] == '\t'))
        line[--len] = '\0';
    while (*line == ' ' || *line == '\t')
        line++;
    if (!*line || *line == '#')
        return true;
    return add_entry(d, line, where, l);
}

/* Reads and checks every line of f into l; 65 after reporting every bad
 * line. */
static int read_import(FILE *f, const char *name, const struct rdomain *d,
                       struct strlist *l)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    unsigned long lineno = 0, bad = 0;
    while ((got = getline(&line, &cap, f)) >= 0) {
        size_t len = (size_t)got;
        if (len > 0 && line[len - 1] == '\n')
            line[--len] = '\0';
        if (len > 0 && line[len - 1] == '\r')
            line[--len] = '\0';
        if (!import_line(d, name, ++lineno, line, len, l))
            bad++;
    }
    int err = errno;
    bool broken = ferror(f);
    free(line);
    if (broken)
        return fail(err == EACCES ? EX_NOPERM : EX_DATAERR, "%s: cannot read: "
                    "%s", name, strerror(err));
    if (bad)
        return fail(EX_DATAERR, "%s: %lu bad line%s, nothing stored", name,
                    bad, bad == 1 ? "" : "s");
    return EX_OK;
}

/* recipient import DOMAIN FILE: the file is read before odmrctl switches
 * users (a root shell's file need not be readable by the daemon user). */
static int import_file(struct ctl *c, const char *darg, const char *path)
{
    struct rdomain d;
    int rc = domain_arg(darg, &d);
    if (rc != EX_OK)
        return rc;
    bool is_stdin = !strcmp(path, "-");
    const char *name = is_stdin ? "stdin" : path;
    FILE *f = is_stdin ? stdin : fopen(path, "r");
    if (!f)
        return fail(errno == EACCES ? EX_NOPERM : EX_DATAERR, "%s: %s", path,
                    strerror(errno));
    struct strlist l = {0};
    rc = read_import(f, name, &d, &l);
    if (!is_stdin)
        fclose(f);
    if (rc == EX_OK)
        rc = apply(c, &d, &l, true);
    strlist_free(&l);
    return rc;
}

/* --------------------------------------------------------------- list */

static void print_entry(void *ctx, const char *local)
{
    const struct rdomain *d = ctx;
    char buf[ADDR_LOCAL_MAX + 1];
    printf("%s@%s\n", strcmp(local, RECIPIENT_CATCHALL)
                          ? printable(local, buf, sizeof buf) : "", d->shown);
}

static int list_recipients(struct ctl *c, const char *darg)
{
    struct rdomain d;
    int rc = domain_arg(darg, &d);
    if (rc == EX_OK)
        rc = ctl_prepare(c);
    if (rc == EX_OK)
        rc = check_hosted(c, &d);
    if (rc != EX_OK)
        return rc;
    enum acct_result r = recipients_list(c->conf.accounts_db, d.key,
                                         print_entry, &d);
    if (r == ACCT_NOTFOUND)
        return fail(EX_OK, "%s has no recipient list (every address is "
                    "accepted)", d.shown);
    return acct_status(c, r);
}

/* ------------------------------------------------------------ commands */

int drop_recipient_list(struct ctl *c, const char *domain)
{
    enum acct_result r = recipients_drop(c->conf.accounts_db, domain);
    if (r == ACCT_OK || r == ACCT_NOTFOUND || r == ACCT_NODB)
        return EX_OK;
    return acct_status(c, r);
}

int cmd_recipient(struct ctl *c, int argc, char **argv)
{
    static const char usage[] =
        "recipient add|del DOMAIN ADDR... | recipient list DOMAIN | "
        "recipient import DOMAIN FILE";
    const char *sub = argc > 0 ? argv[0] : "";
    bool add = !strcmp(sub, "add");
    if ((add || !strcmp(sub, "del")) && argc >= 3)
        return change_args(c, argv[1], argc - 2, argv + 2, add);
    if (!strcmp(sub, "list") && argc == 2)
        return list_recipients(c, argv[1]);
    if (!strcmp(sub, "import") && argc == 3)
        return import_file(c, argv[1], argv[2]);
    return usage_error(usage);
}
