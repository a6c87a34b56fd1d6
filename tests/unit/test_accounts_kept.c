/* test_accounts_kept.c - the read handle server/accounts.c keeps open
 * between lookups: it never blocks a writer while idle, and every change
 * (in place, by another process, or by replacing the file) is seen by
 * the next lookup. */
#include <dirent.h>
#include <gdbm.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../server/accounts.h"
#include "check.h"

static char dir[] = "/tmp/odmr-test-kept-XXXXXX";
static char db[300];

/* How many of our descriptors are open on path. */
static int open_count(const char *path)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    char link[PATH_MAX + 32], target[PATH_MAX];
    int n = 0;

    while (d && (e = readdir(d)) != NULL) {
        snprintf(link, sizeof link, "/proc/self/fd/%s", e->d_name);
        ssize_t len = readlink(link, target, sizeof target - 1);
        if (len > 0) {
            target[len] = '\0';
            n += strcmp(target, path) == 0;
        }
    }
    if (d)
        closedir(d);
    return n;
}

static bool password_is(const char *name, const char *want)
{
    char pw[PASSWORD_MAX + 1];
    return accounts_password(db, name, pw, sizeof pw) == ACCT_OK &&
           strcmp(pw, want) == 0;
}

/* A writer in another process, as odmrctl is. */
static int child_passwd(const char *name, const char *pw)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(accounts_user_passwd(db, name, pw) == ACCT_OK ? 0 : 1);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 99;
}

static void test_kept_and_changes(void)
{
    CHECK(accounts_user_add(db, "alice", "one") == ACCT_OK);
    CHECK(accounts_domain_add(db, "example.org", "alice") == ACCT_OK);
    sleep(3);   /* past the settling time: the handle will be kept */
    CHECK(password_is("alice", "one"));
    CHECK(open_count(db) == 1);               /* kept open */
    CHECK(password_is("alice", "one"));
    CHECK(open_count(db) == 1);               /* and reused */
    /* idle, it does not block a writer (odmrctl waits at most 3 s) */
    time_t t0 = time(NULL);
    CHECK(child_passwd("alice", "two") == 0); /* same length, in place */
    CHECK(time(NULL) - t0 < 2);
    CHECK(password_is("alice", "two"));
    CHECK(child_passwd("alice", "six") == 0); /* again within the tick */
    CHECK(password_is("alice", "six"));
    char owner[ACCOUNT_NAME_MAX + 1];
    CHECK(accounts_domain_owner(db, "example.org", owner, sizeof owner) ==
          ACCT_OK && strcmp(owner, "alice") == 0);
    CHECK(accounts_user_del(db, "alice") == ACCT_OK);
    CHECK(accounts_password(db, "alice", owner, sizeof owner) ==
          ACCT_NOTFOUND);
    CHECK(accounts_domain_owner(db, "example.org", owner, sizeof owner) ==
          ACCT_NOTFOUND);
}

static void test_replaced_file(void)
{
    char other[320];
    snprintf(other, sizeof other, "%s/other.db", dir);
    CHECK(accounts_user_add(other, "bob", "bobpw") == ACCT_OK);
    CHECK(accounts_user_add(db, "carol", "carolpw") == ACCT_OK);
    sleep(3);
    CHECK(password_is("carol", "carolpw"));
    CHECK(rename(other, db) == 0);            /* a new inode */
    CHECK(password_is("bob", "bobpw"));
    char pw[PASSWORD_MAX + 1];
    CHECK(accounts_password(db, "carol", pw, sizeof pw) == ACCT_NOTFOUND);
    CHECK(unlink(db) == 0);
    CHECK(accounts_password(db, "bob", pw, sizeof pw) == ACCT_NODB);
    CHECK(open_count(db) == 0);
}

/* A child must not use (or lock) its parent's handle. */
static void test_fork(void)
{
    CHECK(accounts_user_add(db, "dave", "davepw") == ACCT_OK);
    CHECK(password_is("dave", "davepw"));
    pid_t pid = fork();
    if (pid == 0)
        _exit(password_is("dave", "davepw") ? 0 : 1);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(password_is("dave", "davepw"));
}

int main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(db, sizeof db, "%s/accounts.db", dir);
    test_kept_and_changes();
    test_replaced_file();
    test_fork();
    unlink(db);
    rmdir(dir);
    CHECK_DONE();
}
