/* test_recipients.c - per-domain recipient lists (server/recipients.c),
 * in a fresh database under /tmp. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../server/accounts.h"
#include "../../server/recipients.h"
#include "check.h"

static char dir[] = "/tmp/odmr-test-recipients-XXXXXX";
static char db[256];

static enum rcpt_result check_rcpt(const char *domain, const char *local)
{
    char owner[ACCOUNT_NAME_MAX + 1] = "";
    return recipients_check(db, domain, local, owner, sizeof owner, NULL);
}

static size_t change(const char *domain, bool add, const char *a, const char *b)
{
    const char *v[2] = {a, b};
    size_t changed = 99;
    CHECK(recipients_change(db, domain, v, b ? 2 : 1, add, false, &changed) == ACCT_OK);
    return changed;
}

struct names {
    char text[512];
    int n;
};

static void add_name(void *ctx, const char *name)
{
    struct names *s = ctx;
    size_t len = strlen(s->text);
    snprintf(s->text + len, sizeof s->text - len, "%s,", name);
    s->n++;
}

static void test_catch_all_until_a_list(void)
{
    bool has_list = true;
    char owner[ACCOUNT_NAME_MAX + 1];
    CHECK(recipients_check(db, "example.org", "anyone", owner, sizeof owner,
                           &has_list) == RCPT_VALID);
    CHECK_STR(owner, "alice");
    CHECK(!has_list);
    CHECK(check_rcpt("not-hosted.test", "anyone") == RCPT_NO_DOMAIN);
    CHECK(change("example.org", true, "Bob", "carol") == 2);
    CHECK(recipients_check(db, "EXAMPLE.org", "bob", owner, sizeof owner,
                           &has_list) == RCPT_VALID);
    CHECK(has_list);
    CHECK(check_rcpt("example.org", "BOB") == RCPT_VALID);
    CHECK(check_rcpt("example.org", "bob+lists") == RCPT_VALID);
    CHECK(check_rcpt("example.org", "carol") == RCPT_VALID);
    CHECK(check_rcpt("example.org", "dave") == RCPT_UNKNOWN_USER);
    CHECK(check_rcpt("example.org", "+bob") == RCPT_UNKNOWN_USER);
    CHECK(check_rcpt("example.org", "\"bob\"") == RCPT_VALID);    /* same mailbox */
    CHECK(check_rcpt("example.org", "\"bob x\"") == RCPT_UNKNOWN_USER);
    CHECK(check_rcpt("example.org", "PostMaster") == RCPT_VALID);  /* RFC 5321 4.5.1 */
    unsigned long count = 0;
    CHECK(recipients_count(db, "example.org", &count) == ACCT_OK && count == 2);
    CHECK(recipients_count(db, "example.net", &count) == ACCT_NOTFOUND);
    CHECK(check_rcpt("example.net", "dave") == RCPT_VALID);   /* no list there */
    CHECK(change("example.org", true, "bob", NULL) == 0);     /* already there */
    CHECK(change("example.org", true, RECIPIENT_CATCHALL, NULL) == 1);
    CHECK(check_rcpt("example.org", "dave") == RCPT_VALID);
    CHECK(change("example.org", false, RECIPIENT_CATCHALL, NULL) == 1);
    CHECK(check_rcpt("example.org", "dave") == RCPT_UNKNOWN_USER);
}

static void test_list_and_removal(void)
{
    struct names n = {"", 0};
    CHECK(recipients_list(db, "example.org", add_name, &n) == ACCT_OK);
    CHECK_STR(n.text, "bob,carol,");
    struct names none = {"", 0};
    CHECK(recipients_list(db, "example.net", add_name, &none) == ACCT_NOTFOUND);
    CHECK(change("example.org", false, "bob", "nobody") == 1);
    CHECK(check_rcpt("example.org", "bob") == RCPT_UNKNOWN_USER);
    /* removing the last entry makes the domain catch-all again */
    CHECK(change("example.org", false, "carol", NULL) == 1);
    CHECK(check_rcpt("example.org", "bob") == RCPT_VALID);
    CHECK(recipients_list(db, "example.org", add_name, &none) == ACCT_NOTFOUND);
    /* lists belong to hosted domains; bad local parts are refused */
    const char *v[1] = {"x"};
    size_t changed;
    CHECK(recipients_change(db, "other.test", v, 1, true, false, &changed) == ACCT_NOTFOUND);
    v[0] = "";
    CHECK(recipients_change(db, "example.org", v, 1, true, false, &changed) == ACCT_NOTFOUND);
    v[0] = "a b";
    CHECK(recipients_change(db, "example.org", v, 1, true, false, &changed) == ACCT_NOTFOUND);
}

static void test_idn_spellings_and_drop(void)
{
    CHECK(accounts_domain_add(db, "\xc3\xbcn\xc3\xaf.test", "alice") == ACCT_OK);
    CHECK(change("xn--n-nga1b.test", true, "u", NULL) == 1);
    CHECK(check_rcpt("\xc3\xbcn\xc3\xaf.test", "u") == RCPT_VALID);
    CHECK(check_rcpt("\xc3\xbcn\xc3\xaf.test", "v") == RCPT_UNKNOWN_USER);
    CHECK(recipients_drop(db, "\xc3\xbcn\xc3\xaf.test") == ACCT_OK);
    CHECK(check_rcpt("xn--n-nga1b.test", "v") == RCPT_VALID);
}

/* An import in several transactions: the held batches switch nothing on,
 * the last one counts them all (odmrctl recipient import). */
static void test_held_batches(void)
{
    const char *ab[2] = {"a", "b"}, *c[1] = {"c"};
    size_t changed = 0;
    unsigned long count = 99;
    CHECK(accounts_domain_add(db, "held.test", "alice") == ACCT_OK);
    CHECK(recipients_change(db, "held.test", ab, 2, true, true, &changed) ==
          ACCT_OK);
    CHECK(changed == 2);
    CHECK(recipients_count(db, "held.test", &count) == ACCT_NOTFOUND);
    CHECK(check_rcpt("held.test", "zed") == RCPT_VALID);   /* not on yet */
    CHECK(recipients_change(db, "held.test", c, 1, true, false, &changed) ==
          ACCT_OK);
    CHECK(recipients_count(db, "held.test", &count) == ACCT_OK);
    CHECK(count == 3);
    CHECK(check_rcpt("held.test", "zed") == RCPT_UNKNOWN_USER);
    CHECK(check_rcpt("held.test", "a") == RCPT_VALID);
    /* hold means nothing once the list is on */
    const char *d[1] = {"d"};
    CHECK(recipients_change(db, "held.test", d, 1, true, true, &changed) ==
          ACCT_OK);
    CHECK(recipients_count(db, "held.test", &count) == ACCT_OK);
    CHECK(count == 4);
}

/* A batch that fails half way on a list that is on: the count still
 * matches the entries, so neither a later removal of the last real
 * entry leaves an empty list on, nor does the list go off too early. */
static void test_failed_batch_keeps_the_count(void)
{
    const char *x[1] = {"x"}, *add[3] = {"a", "b", "a b"}, *del[2] = {"a", "a b"};
    size_t changed = 0;
    unsigned long count = 0;
    CHECK(accounts_domain_add(db, "half.test", "alice") == ACCT_OK);
    CHECK(recipients_change(db, "half.test", x, 1, true, false, &changed) ==
          ACCT_OK);
    CHECK(recipients_change(db, "half.test", add, 3, true, false, &changed) ==
          ACCT_NOTFOUND);
    CHECK(changed == 2);
    CHECK(recipients_count(db, "half.test", &count) == ACCT_OK && count == 3);
    CHECK(recipients_change(db, "half.test", del, 2, false, false, &changed) ==
          ACCT_NOTFOUND);
    CHECK(changed == 1);
    CHECK(recipients_count(db, "half.test", &count) == ACCT_OK && count == 2);
    const char *rest[2] = {"x", "b"};
    CHECK(recipients_change(db, "half.test", rest, 2, false, false, &changed) ==
          ACCT_OK);
    CHECK(recipients_count(db, "half.test", &count) == ACCT_NOTFOUND);
    CHECK(check_rcpt("half.test", "anybody") == RCPT_VALID);
}

/* 100,000 entries: the check stays a few fetches (measured, printed). */
static void test_large_list(void)
{
    enum { N = 100000 };
    static char names[N][16];
    static const char *v[N];
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "user%d", i);
        v[i] = names[i];
    }
    size_t changed;
    CHECK(recipients_change(db, "example.net", v, N, true, false, &changed) == ACCT_OK);
    CHECK(changed == N);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int ok = 0;
    for (int i = 0; i < 1000; i++)
        ok += check_rcpt("example.net", names[(i * 97) % N]) == RCPT_VALID;
    ok += check_rcpt("example.net", "user100000") == RCPT_UNKNOWN_USER;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double us = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / 1001;
    printf("  recipient check with %d entries: %.1f us each\n", N, us);
    CHECK(ok == 1001);
    CHECK(us < 5000);
}

int main(void)
{
    if (!mkdtemp(dir))
        return 1;
    snprintf(db, sizeof db, "%s/accounts.db", dir);
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(db, "example.org", "alice") == ACCT_OK);
    CHECK(accounts_domain_add(db, "example.net", "alice") == ACCT_OK);
    test_catch_all_until_a_list();
    test_list_and_removal();
    test_idn_spellings_and_drop();
    test_large_list();
    test_held_batches();
    test_failed_batch_keeps_the_count();
    unlink(db);
    rmdir(dir);
    CHECK_DONE();
}
