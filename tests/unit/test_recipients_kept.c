/* test_recipients_kept.c - the RCPT answers server/recipients.c keeps
 * between lookups: a kept answer is given without reading the database
 * (so even while a writer holds its lock), and every change of the file -
 * in place by another process, within the same clock tick, or by
 * replacing the file - is seen by the next lookup. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../server/accounts.h"
#include "../../server/recipients.h"
#include "check.h"

static char dir[] = "/tmp/odmr-test-rcpt-kept-XXXXXX";
static char db[300];

static enum rcpt_result rcpt(const char *domain, const char *local, char *owner)
{
    char scratch[ACCOUNT_NAME_MAX + 1];
    return recipients_check(db, domain, local, owner ? owner : scratch,
                            sizeof scratch, NULL);
}

/* A writer in another process, as odmrctl is: adds (or removes) local
 * to the domain's list. */
static int child_list(const char *domain, const char *local, bool add)
{
    pid_t pid = fork();
    if (pid == 0) {
        const char *v[1] = {local};
        size_t changed;
        _exit(recipients_change(db, domain, v, 1, add, false, &changed) == ACCT_OK ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 99;
}

static void test_kept_while_locked(void)
{
    char owner[ACCOUNT_NAME_MAX + 1] = "";
    CHECK(accounts_user_add(db, "alice", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(db, "example.org", "alice") == ACCT_OK);
    sleep(3);   /* past the settling time: answers will be kept */
    CHECK(rcpt("example.org", "anyone", owner) == RCPT_VALID);
    CHECK_STR(owner, "alice");
    CHECK(rcpt("not-hosted.test", "anyone", NULL) == RCPT_NO_DOMAIN);
    /* a writer holds the lock: a read would wait 3 s and fail; the kept
     * answers come at once */
    int fd = open(db, O_RDWR);
    CHECK(fd >= 0 && flock(fd, LOCK_EX) == 0);
    time_t t0 = time(NULL);
    owner[0] = '\0';
    CHECK(rcpt("EXAMPLE.org", "someone", owner) == RCPT_VALID);
    CHECK_STR(owner, "alice");
    CHECK(rcpt("not-hosted.test", "x", NULL) == RCPT_NO_DOMAIN);
    CHECK(time(NULL) - t0 < 2);
    close(fd);
}

static void test_changes_seen(void)
{
    CHECK(rcpt("example.org", "bob", NULL) == RCPT_VALID);   /* kept */
    CHECK(child_list("example.org", "carol", true) == 0);   /* in place */
    CHECK(rcpt("example.org", "bob", NULL) == RCPT_UNKNOWN_USER);
    CHECK(rcpt("example.org", "carol", NULL) == RCPT_VALID);
    CHECK(child_list("example.org", "carol", false) == 0);  /* same tick */
    CHECK(rcpt("example.org", "bob", NULL) == RCPT_VALID);
    CHECK(accounts_domain_add(db, "example.net", "alice") == ACCT_OK);
    CHECK(rcpt("example.net", "x", NULL) == RCPT_VALID);
    CHECK(accounts_domain_del(db, "example.org") == ACCT_OK);
    CHECK(rcpt("example.org", "bob", NULL) == RCPT_NO_DOMAIN);
}

static void test_replaced_file(void)
{
    char other[320];
    snprintf(other, sizeof other, "%s/other.db", dir);
    CHECK(accounts_user_add(other, "dave", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(other, "example.com", "dave") == ACCT_OK);
    sleep(3);
    CHECK(rcpt("example.net", "x", NULL) == RCPT_VALID);    /* kept */
    CHECK(rcpt("example.com", "x", NULL) == RCPT_NO_DOMAIN); /* kept */
    CHECK(rename(other, db) == 0);
    CHECK(rcpt("example.net", "x", NULL) == RCPT_NO_DOMAIN);
    char owner[ACCOUNT_NAME_MAX + 1] = "";
    CHECK(rcpt("example.com", "x", owner) == RCPT_VALID);
    CHECK_STR(owner, "dave");
    CHECK(unlink(db) == 0);
    CHECK(rcpt("example.com", "x", NULL) == RCPT_NO_DOMAIN);
}

int main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(db, sizeof db, "%s/accounts.db", dir);
    test_kept_while_locked();
    test_changes_seen();
    test_replaced_file();
    unlink(db);
    rmdir(dir);
    CHECK_DONE();
}
