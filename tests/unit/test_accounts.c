/* test_accounts.c - the GDBM account and domain database (server/accounts.c).
 * Works in a fresh directory under /tmp; every case uses its own file. */
#include <errno.h>
#include <fcntl.h>
#include <gdbm.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../server/accounts.h"
#include "check.h"

static char dir[] = "/tmp/odmr-test-accounts-XXXXXX";

/* A database path unique to the test case. */
static const char *db_path(const char *name)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s.db", dir, name);
    return path;
}

static long elapsed_ms(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
}

/* --- collectors for the listing callbacks --- */

struct names {
    char text[4096];   /* "a,b,c," */
    int n;
};

static void add_name(void *ctx, const char *name)
{
    struct names *s = ctx;
    size_t len = strlen(s->text);
    snprintf(s->text + len, sizeof s->text - len, "%s,", name);
    s->n++;
}

static void add_binding(void *ctx, const char *domain, const char *name)
{
    struct names *s = ctx;
    size_t len = strlen(s->text);
    snprintf(s->text + len, sizeof s->text - len, "%s=%s,", domain, name);
    s->n++;
}

/* Counts names and checks each one sorts after the previous one. */
struct order_check {
    char prev[ACCOUNT_NAME_MAX + 1];
    int n;
    bool sorted;
};

static void check_order(void *ctx, const char *name)
{
    struct order_check *oc = ctx;
    if (oc->n > 0 && strcmp(oc->prev, name) >= 0)
        oc->sorted = false;
    snprintf(oc->prev, sizeof oc->prev, "%s", name);
    oc->n++;
}

static const char *owner_of(const char *db, const char *domain)
{
    static char owner[ACCOUNT_NAME_MAX + 1];
    enum acct_result r = accounts_domain_owner(db, domain, owner, sizeof owner);
    if (r != ACCT_OK)
        snprintf(owner, sizeof owner, "(%s)", acct_strerror(r));
    return owner;
}

/* --- cases --- */

static void test_missing_db(void)
{
    const char *db = db_path("missing");
    char buf[PASSWORD_MAX + 1];
    struct names s = {"", 0};
    CHECK(accounts_domain_owner(db, "example.com", buf, sizeof buf) == ACCT_NODB);
    CHECK(accounts_password(db, "alice", buf, sizeof buf) == ACCT_NODB);
    CHECK(accounts_users(db, add_name, &s) == ACCT_NODB);
    CHECK(accounts_domains(db, add_binding, &s) == ACCT_NODB);
    CHECK(s.n == 0);
    /* Writers other than user add do not create the file. */
    CHECK(accounts_user_passwd(db, "alice", "pw") == ACCT_NODB);
    CHECK(accounts_user_del(db, "alice") == ACCT_NODB);
    CHECK(accounts_domain_add(db, "example.com", "alice") == ACCT_NODB);
    CHECK(accounts_domain_del(db, "example.com") == ACCT_NODB);
    CHECK(access(db, F_OK) != 0);
    /* user add in a directory that does not exist cannot create it. */
    char nodir[300];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir.db", dir);
    CHECK(accounts_user_add(nodir, "alice", "pw") == ACCT_NODB);
}

static void test_add_and_mode(void)
{
    const char *db = db_path("add");
    char pw[PASSWORD_MAX + 1];
    mode_t old = umask(0);   /* the file must be 0600 whatever the umask */
    CHECK(accounts_user_add(db, "alice", "s3cret pass") == ACCT_OK);
    umask(old);
    struct stat st;
    CHECK(stat(db, &st) == 0 && (st.st_mode & 07777) == 0600);
    CHECK(accounts_password(db, "alice", pw, sizeof pw) == ACCT_OK);
    CHECK_STR(pw, "s3cret pass");
    CHECK(accounts_user_add(db, "alice", "other") == ACCT_EXISTS);
    CHECK(accounts_password(db, "alice", pw, sizeof pw) == ACCT_OK);
    CHECK_STR(pw, "s3cret pass");
    CHECK(accounts_password(db, "bob", pw, sizeof pw) == ACCT_NOTFOUND);
    /* Account names are case-sensitive (they are SASL identities). */
    CHECK(accounts_password(db, "Alice", pw, sizeof pw) == ACCT_NOTFOUND);
    /* A buffer too small is an error, never a truncated password. */
    char tiny[4];
    CHECK(accounts_password(db, "alice", tiny, sizeof tiny) == ACCT_TEMPFAIL);
}

static void test_passwd(void)
{
    const char *db = db_path("passwd");
    char pw[PASSWORD_MAX + 1];
    CHECK(accounts_user_add(db, "alice", "old") == ACCT_OK);
    CHECK(accounts_user_passwd(db, "alice", "new") == ACCT_OK);
    CHECK(accounts_password(db, "alice", pw, sizeof pw) == ACCT_OK);
    CHECK_STR(pw, "new");
    CHECK(accounts_user_passwd(db, "bob", "x") == ACCT_NOTFOUND);
    CHECK(accounts_password(db, "bob", pw, sizeof pw) == ACCT_NOTFOUND);
    CHECK(accounts_user_passwd(db, "alice", "") == ACCT_NOTFOUND);
    CHECK(accounts_user_passwd(db, "alice", "a\nb") == ACCT_NOTFOUND);
    CHECK(accounts_password(db, "alice", pw, sizeof pw) == ACCT_OK);
    CHECK_STR(pw, "new");
}

static void test_invalid_names(void)
{
    const char *db = db_path("invalid");
    char long_name[ACCOUNT_NAME_MAX + 2];
    memset(long_name, 'a', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';         /* 256 characters */
    CHECK(!account_name_valid(long_name));
    long_name[ACCOUNT_NAME_MAX] = '\0';              /* 255 characters */
    CHECK(account_name_valid(long_name));
    CHECK(!account_name_valid(""));
    CHECK(!account_name_valid(NULL));
    CHECK(!account_name_valid("a:b"));
    CHECK(!account_name_valid("a b"));
    CHECK(!account_name_valid("a\tb"));
    CHECK(!account_name_valid("caf\xc3\xa9"));
    CHECK(account_name_valid("user@realm.example"));

    CHECK(accounts_user_add(db, "a:b", "pw") == ACCT_NOTFOUND);
    CHECK(accounts_user_add(db, "", "pw") == ACCT_NOTFOUND);
    CHECK(accounts_user_add(db, long_name, "pw") == ACCT_OK);
    CHECK(accounts_user_add(db, "bob", "") == ACCT_NOTFOUND);
    CHECK(accounts_user_add(db, "bob", "line1\nline2") == ACCT_NOTFOUND);
    CHECK(accounts_user_add(db, "bob", "cr\r") == ACCT_NOTFOUND);

    char big[PASSWORD_MAX + 2];
    memset(big, 'p', sizeof big - 1);
    big[sizeof big - 1] = '\0';                      /* PASSWORD_MAX + 1 */
    CHECK(accounts_user_add(db, "bob", big) == ACCT_NOTFOUND);
    big[PASSWORD_MAX] = '\0';                        /* PASSWORD_MAX */
    CHECK(accounts_user_add(db, "bob", big) == ACCT_OK);
    char pw[PASSWORD_MAX + 1];
    CHECK(accounts_password(db, "bob", pw, sizeof pw) == ACCT_OK);
    CHECK(strcmp(pw, big) == 0);

    struct names s = {"", 0};
    CHECK(accounts_users(db, add_name, &s) == ACCT_OK);
    CHECK(s.n == 2);

    /* Domains: LDH labels only, no address literals. */
    CHECK(accounts_domain_add(db, "bad..example", "bob") == ACCT_NOTFOUND);
    CHECK(accounts_domain_add(db, "-bad.example", "bob") == ACCT_NOTFOUND);
    CHECK(accounts_domain_add(db, "[192.0.2.1]", "bob") == ACCT_NOTFOUND);
    CHECK(accounts_domain_add(db, "", "bob") == ACCT_NOTFOUND);
    CHECK(accounts_domain_add(db, "ok.example", "a:b") == ACCT_NOTFOUND);
    struct names d = {"", 0};
    CHECK(accounts_domains(db, add_binding, &d) == ACCT_OK);
    CHECK(d.n == 0);
}

static void test_domain_add(void)
{
    const char *db = db_path("domain");
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    CHECK(accounts_user_add(db, "bob", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(db, "a.example", "nobody") == ACCT_NOTFOUND);
    CHECK_STR(owner_of(db, "a.example"), "(not found)");
    CHECK(accounts_domain_add(db, "a.example", "alice") == ACCT_OK);
    CHECK(accounts_domain_add(db, "a.example", "alice") == ACCT_OK);
    CHECK(accounts_domain_add(db, "a.example", "bob") == ACCT_EXISTS);
    CHECK_STR(owner_of(db, "a.example"), "alice");
    /* A NULL buffer asks only whether the domain is bound. */
    CHECK(accounts_domain_owner(db, "a.example", NULL, 0) == ACCT_OK);
    CHECK(accounts_domain_owner(db, "b.example", NULL, 0) == ACCT_NOTFOUND);
    CHECK(accounts_domain_del(db, "a.example") == ACCT_OK);
    CHECK(accounts_domain_del(db, "a.example") == ACCT_NOTFOUND);
    CHECK(accounts_domain_add(db, "a.example", "bob") == ACCT_OK);
    CHECK_STR(owner_of(db, "a.example"), "bob");
}

static void test_case_insensitive_domains(void)
{
    const char *db = db_path("case");
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    CHECK(accounts_user_add(db, "bob", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(db, "Example.COM", "alice") == ACCT_OK);
    CHECK_STR(owner_of(db, "example.com"), "alice");
    CHECK_STR(owner_of(db, "EXAMPLE.com"), "alice");
    CHECK(accounts_domain_add(db, "EXAMPLE.COM", "alice") == ACCT_OK);
    CHECK(accounts_domain_add(db, "example.com", "bob") == ACCT_EXISTS);
    struct names s = {"", 0};
    CHECK(accounts_domains(db, add_binding, &s) == ACCT_OK);
    CHECK_STR(s.text, "example.com=alice,");
    CHECK(accounts_domain_del(db, "eXample.Com") == ACCT_OK);
    CHECK_STR(owner_of(db, "example.com"), "(not found)");
}

/* A binding as an older version stored it: alice under the UTF-8 key. */
static void store_legacy_binding(const char *db)
{
    GDBM_FILE f = gdbm_open(db, 0, GDBM_WRITER, 0600, NULL);
    CHECK(f != NULL);
    if (!f)
        return;
    char k[] = "d:b\xc3\xbc" "cher.example", v[] = "alice";
    datum key = {k, (int)strlen(k)}, val = {v, (int)strlen(v)};
    CHECK(gdbm_store(f, key, val, GDBM_REPLACE) == 0);
    gdbm_close(f);
}

/* A binding an older version stored under its UTF-8 spelling is found by
 * the IDNA key too, which is how ATRN and a lingering session ask. */
static void test_legacy_utf8_binding(void)
{
    const char *db = db_path("legacy");
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    store_legacy_binding(db);
    CHECK_STR(owner_of(db, "b\xc3\xbc" "cher.example"), "alice");
    CHECK_STR(owner_of(db, "xn--bcher-kva.example"), "alice");
    CHECK_STR(owner_of(db, "xn--nxasmq6b.example"), "(not found)");
    /* The legacy binding is the domain's binding: no second owner beside
     * it, and removing the domain removes it under either spelling. */
    CHECK(accounts_user_add(db, "bob", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(db, "xn--bcher-kva.example", "bob") == ACCT_EXISTS);
    CHECK(accounts_domain_add(db, "B\xc3\xbc" "cher.example", "bob") == ACCT_EXISTS);
    CHECK(accounts_domain_add(db, "xn--bcher-kva.example", "alice") == ACCT_OK);
    CHECK(accounts_domain_del(db, "xn--bcher-kva.example") == ACCT_OK);
    CHECK_STR(owner_of(db, "b\xc3\xbc" "cher.example"), "(not found)");
    CHECK_STR(owner_of(db, "xn--bcher-kva.example"), "(not found)");
    CHECK(accounts_domain_del(db, "b\xc3\xbc" "cher.example") == ACCT_NOTFOUND);
    CHECK(accounts_domain_add(db, "xn--bcher-kva.example", "bob") == ACCT_OK);
    CHECK_STR(owner_of(db, "b\xc3\xbc" "cher.example"), "bob");
    /* both keys, as an older version could leave them: one del takes
     * both; an old-only binding goes by its UTF-8 spelling too */
    store_legacy_binding(db);
    CHECK_STR(owner_of(db, "xn--bcher-kva.example"), "bob");
    CHECK(accounts_domain_del(db, "b\xc3\xbc" "cher.example") == ACCT_OK);
    CHECK_STR(owner_of(db, "xn--bcher-kva.example"), "(not found)");
    CHECK_STR(owner_of(db, "b\xc3\xbc" "cher.example"), "(not found)");
    store_legacy_binding(db);
    CHECK(accounts_domain_del(db, "B\xc3\xbc" "cher.example") == ACCT_OK);
    CHECK_STR(owner_of(db, "xn--bcher-kva.example"), "(not found)");
}

static void test_user_del_cascade(void)
{
    const char *db = db_path("cascade");
    char pw[PASSWORD_MAX + 1];
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    CHECK(accounts_user_add(db, "bob", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(db, "a.example", "alice") == ACCT_OK);
    CHECK(accounts_domain_add(db, "b.example", "alice") == ACCT_OK);
    CHECK(accounts_domain_add(db, "c.example", "bob") == ACCT_OK);
    CHECK(accounts_user_del(db, "alice") == ACCT_OK);
    CHECK(accounts_password(db, "alice", pw, sizeof pw) == ACCT_NOTFOUND);
    CHECK_STR(owner_of(db, "a.example"), "(not found)");
    CHECK_STR(owner_of(db, "b.example"), "(not found)");
    CHECK_STR(owner_of(db, "c.example"), "bob");
    CHECK(accounts_user_del(db, "alice") == ACCT_NOTFOUND);
    CHECK(accounts_user_del(db, "a:b") == ACCT_NOTFOUND);
    struct names s = {"", 0};
    CHECK(accounts_users(db, add_name, &s) == ACCT_OK);
    CHECK_STR(s.text, "bob,");
    /* The name is free again, without its old domains. */
    CHECK(accounts_user_add(db, "alice", "pw2") == ACCT_OK);
    CHECK_STR(owner_of(db, "a.example"), "(not found)");
}

static void test_listing_order(void)
{
    const char *db = db_path("order");
    const char *users[] = {"zed", "alice", "mike", "Bob", "carol"};
    const char *domains[] = {"zz.example", "a.example", "m.example",
                             "b.example", "aa.example"};
    for (size_t i = 0; i < 5; i++) {
        CHECK(accounts_user_add(db, users[i], "pw") == ACCT_OK);
        CHECK(accounts_domain_add(db, domains[i], users[i]) == ACCT_OK);
    }
    struct names u = {"", 0}, d = {"", 0};
    CHECK(accounts_users(db, add_name, &u) == ACCT_OK);
    CHECK_STR(u.text, "Bob,alice,carol,mike,zed,");
    CHECK(accounts_domains(db, add_binding, &d) == ACCT_OK);
    CHECK_STR(d.text, "a.example=alice,aa.example=carol,b.example=Bob,"
                      "m.example=mike,zz.example=zed,");

    /* Many entries: still complete and sorted. */
    const char *big = db_path("order-big");
    char name[32];
    for (int i = 999; i >= 0; i--) {
        snprintf(name, sizeof name, "user%04d", i);
        if (accounts_user_add(big, name, "pw") != ACCT_OK)
            break;
    }
    struct order_check oc = {"", 0, true};
    CHECK(accounts_users(big, check_order, &oc) == ACCT_OK);
    CHECK(oc.n == 1000);
    CHECK(oc.sorted);
}

static void test_empty_file(void)
{
    const char *db = db_path("empty");
    int fd = open(db, O_WRONLY | O_CREAT | O_EXCL, 0600);
    CHECK(fd >= 0);
    if (fd >= 0)
        close(fd);
    struct names s = {"", 0};
    CHECK(accounts_domain_owner(db, "example.com", NULL, 0) == ACCT_NOTFOUND);
    CHECK(accounts_users(db, add_name, &s) == ACCT_OK);
    CHECK(s.n == 0);
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    CHECK(accounts_users(db, add_name, &s) == ACCT_OK);
    CHECK_STR(s.text, "alice,");
}

static void test_corrupt_file(void)
{
    const char *db = db_path("corrupt");
    FILE *f = fopen(db, "w");
    CHECK(f != NULL);
    if (!f)
        return;
    for (int i = 0; i < 100; i++)
        fputs("this is not a gdbm file\n", f);
    fclose(f);
    CHECK(accounts_domain_owner(db, "example.com", NULL, 0) == ACCT_TEMPFAIL);
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_TEMPFAIL);
}

static void test_permission(void)
{
    if (geteuid() == 0)
        return;   /* root reads anything */
    const char *db = db_path("perm");
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    chmod(db, 0);
    CHECK(accounts_domain_owner(db, "example.com", NULL, 0) == ACCT_PERM);
    CHECK(accounts_user_passwd(db, "alice", "x") == ACCT_PERM);
    chmod(db, 0600);
}

/* A writer holding the lock: readers wait for it, then give up. */
static void test_locking(void)
{
    const char *db = db_path("lock");
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(db, "a.example", "alice") == ACCT_OK);

    GDBM_FILE w = gdbm_open(db, 0, GDBM_WRITER, 0600, NULL);
    CHECK(w != NULL);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(accounts_domain_owner(db, "a.example", NULL, 0) == ACCT_TEMPFAIL);
    long ms = elapsed_ms(&t0);
    CHECK(ms >= 2500 && ms < 6000);
    if (w)
        gdbm_close(w);

    /* A lock released while the reader waits: the reader gets through. */
    int pfd[2];
    CHECK(pipe(pfd) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        GDBM_FILE cw = gdbm_open(db, 0, GDBM_WRITER, 0600, NULL);
        char c = cw ? 'y' : 'n';
        if (write(pfd[1], &c, 1) != 1)
            _exit(1);
        struct timespec pause = {0, 300 * 1000000L};
        nanosleep(&pause, NULL);
        if (cw)
            gdbm_close(cw);
        _exit(0);
    }
    char c = 0;
    CHECK(read(pfd[0], &c, 1) == 1 && c == 'y');
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK_STR(owner_of(db, "a.example"), "alice");
    ms = elapsed_ms(&t0);
    CHECK(ms >= 200 && ms < 2500);
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    close(pfd[0]);
    close(pfd[1]);
}

static void remove_dir(void)
{
    char cmd[300];
    /* The directory name comes from mkdtemp: no shell metacharacters. */
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

int main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_missing_db();
    test_add_and_mode();
    test_passwd();
    test_invalid_names();
    test_domain_add();
    test_case_insensitive_domains();
    test_legacy_utf8_binding();
    test_user_del_cascade();
    test_listing_order();
    test_empty_file();
    test_corrupt_file();
    test_permission();
    test_locking();
    remove_dir();
    CHECK_DONE();
}
