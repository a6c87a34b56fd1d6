/* odmrctl_queue.c - odmrctl queue commands (SPEC 3.3): listing, summary,
 * delete and bounce, and the quarantine milters fill (list, release). */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"
#include "bounce.h"
#include "envelope.h"
#include "odmrctl.h"

/* queue delete waits this long for a delivering session to finish. */
#define DOMAIN_LOCK_WAIT_MS 5000
#define DOMAIN_LOCK_STEP_MS 100
/* Column layout of the queue listing. */
#define QID_COLUMN 20
#define LIST_INDENT (QID_COLUMN + 1 + 8 + 1 + 19 + 1)

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

/* The entry without the empty line that ends it. */
static void print_envelope_lines(const struct envelope *e)
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
}

static void print_envelope(const struct envelope *e)
{
    print_envelope_lines(e);
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

/* What both listings do first: the domain argument as a key (domain is
 * "" without one), privileges, and whether the queue exists yet. */
static int start_listing(struct ctl *c, const char *domain_arg, char *domain,
                         size_t n, bool *exists)
{
    int rc = domain_arg ? queue_domain_arg(domain_arg, domain, n) : EX_OK;
    if (rc == EX_OK)
        rc = ctl_prepare(c);
    if (rc == EX_OK)
        rc = open_queue_for_reading(c, exists);
    return rc;
}

static int queue_list(struct ctl *c, const char *domain_arg)
{
    char domain[ADDR_DOMAIN_MAX + 1] = "";
    bool exists;
    int rc = start_listing(c, domain_arg, domain, sizeof domain, &exists);
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

static int delete_held_copies(struct ctl *c, const char *id, bool *found);

/* queue delete: removes every copy of id, each under its domain's lock.
 * *unknown is set when no domain holds it. */
static int delete_copies(struct ctl *c, const char *id, bool *unknown)
{
    struct strlist domains;
    int rc = EX_OK;
    if (!find_copies(c, id, &domains, &rc))
        return rc;
    bool held = false;
    rc = delete_held_copies(c, id, &held);
    *unknown = domains.n == 0 && !held;
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
        rc = fail(EX_TEMPFAIL, "%s: the report to <%s> cannot be sent or queued "
                  "now; the message stays queued, try again later", id, k.env[0].sender);
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

/* ====================================================== queue: quarantine */

static int list_held_message(void *ctx, const char *id)
{
    struct listing *l = ctx;
    struct envelope e;
    char reason[1024], err[PATH_MAX + 128], buf[1024];
    envelope_init(&e);
    if (!queue_held_load(&l->c->q, l->domain, id, &e, reason, sizeof reason, err,
                         sizeof err)) {
        if (errno != ENOENT)
            l->rc = fail(EX_DATAERR, "%s: unreadable envelope: %s", id, err);
        return 0;
    }
    if (l->messages == 0)
        print_list_header();
    print_envelope_lines(&e);
    printf("%*sreason: %s\n\n", LIST_INDENT, "",
           printable(reason, buf, sizeof buf));
    l->messages++;
    l->bytes += e.size;
    envelope_free(&e);
    return 0;
}

static int list_held_domain(void *ctx, const char *domain)
{
    struct listing *l = ctx;
    l->domain = domain;
    if (queue_held_ids(&l->c->q, domain, list_held_message, l) < 0)
        l->rc = queue_read_error(l->c, domain);
    return 0;
}

/* queue quarantine [DOMAIN]: what milters held, with their reasons. */
static int held_list(struct ctl *c, const char *domain_arg)
{
    char domain[ADDR_DOMAIN_MAX + 1] = "";
    bool exists;
    int rc = start_listing(c, domain_arg, domain, sizeof domain, &exists);
    if (rc != EX_OK)
        return rc;
    struct listing l = {c, domain, 0, 0, EX_OK};
    if (exists && domain_arg)
        list_held_domain(&l, domain);
    else if (exists && queue_held_domains(&c->q, list_held_domain, &l) < 0)
        l.rc = queue_read_error(c, NULL);
    if (l.messages == 0 && l.rc == EX_OK)
        printf("Quarantine is empty\n");
    else if (l.messages)
        printf("-- %lu message%s, %" PRIu64 " byte%s held\n", l.messages,
               l.messages == 1 ? "" : "s", l.bytes, l.bytes == 1 ? "" : "s");
    return l.rc;
}

static bool find_held_copies(struct ctl *c, const char *id,
                             struct strlist *domains, int *rc)
{
    memset(domains, 0, sizeof *domains);
    if (queue_held_find(&c->q, id, collect_string, domains) < 0 ||
        domains->failed) {
        strlist_free(domains);
        *rc = queue_read_error(c, NULL);
        return false;
    }
    return true;
}

/* queue release: every held copy of id back into the queue. */
static int release_copies(struct ctl *c, const char *id, bool *unknown)
{
    struct strlist domains;
    int rc = EX_OK;
    if (!find_held_copies(c, id, &domains, &rc))
        return rc;
    *unknown = domains.n == 0;
    for (size_t i = 0; i < domains.n; i++) {
        if (queue_release(&c->q, domains.v[i], id)) {
            log_info("%s: released from the quarantine of %s by odmrctl (uid %lu)",
                     id, domains.v[i], (unsigned long)c->caller);
            printf("%s: released for %s\n", id, domains.v[i]);
        } else if (errno != ENOENT) {
            rc = fail(access_status(errno), "%s: cannot release for %s: %s", id,
                      domains.v[i], strerror(errno));
        }
    }
    strlist_free(&domains);
    return rc;
}

/* The held copies of id go too when it is deleted. */
static int delete_held_copies(struct ctl *c, const char *id, bool *found)
{
    struct strlist domains;
    int rc = EX_OK;
    if (!find_held_copies(c, id, &domains, &rc))
        return rc;
    for (size_t i = 0; i < domains.n; i++) {
        if (queue_held_remove(&c->q, domains.v[i], id)) {
            *found = true;
            log_info("%s: removed from the quarantine of %s by odmrctl (uid %lu)",
                     id, domains.v[i], (unsigned long)c->caller);
        } else if (errno != ENOENT) {
            rc = fail(access_status(errno), "%s: cannot remove from the "
                      "quarantine of %s: %s", id, domains.v[i], strerror(errno));
        }
    }
    strlist_free(&domains);
    return rc;
}

int cmd_queue(struct ctl *c, int argc, char **argv)
{
    static const char usage[] =
        "queue [DOMAIN] | queue summary | queue delete ID... | "
        "queue delete --domain DOMAIN | queue bounce ID... | "
        "queue quarantine [DOMAIN] | queue release ID...";
    if (argc == 0)
        return queue_list(c, NULL);
    const char *sub = argv[0];
    if (!strcmp(sub, "summary"))
        return argc == 1 ? queue_summary(c) : usage_error(usage);
    if (!strcmp(sub, "quarantine"))
        return argc <= 2 ? held_list(c, argc == 2 ? argv[1] : NULL)
                         : usage_error(usage);
    if (!strcmp(sub, "release"))
        return argc >= 2 ? act_on_ids(c, argc - 1, argv + 1, release_copies)
                         : usage_error(usage);
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

