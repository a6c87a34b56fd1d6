/* test_bounce.c - delivery status notifications (server/bounce.c): the
 * structure of the generated DSN, which recipients get one, and where
 * bounce_message puts it when there is no relay.  Works in a fresh
 * directory under /tmp. */
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../../common/util.h"
#include "../../server/accounts.h"
#include "../../server/bounce.h"
#include "../../server/conf.h"
#include "../../server/queue.h"
#include "check.h"

static char dir[] = "/tmp/odmr-test-bounce-XXXXXX";

#define MESSAGE                                                            \
    "Received: from client.test ([192.0.2.1])\r\n\tby mx.test; now\r\n"      \
    "From: Sender <sender@remote.test>\r\n"                                \
    "Subject: Hello\r\n"                                                   \
    "\r\n"                                                                 \
    "Body line 1\r\n"                                                      \
    ".dot line\r\n"                                                        \
    "SECRET-BODY\r\n"

/* What follows the data in a queue file (server/qfile.h): never part of
 * a report. */
#define AFTER_DATA "V 1\nI NOT-THE-MESSAGE\n.\nQ1 trailer\n"

/* Writes data to a file of the test directory, followed by something that
 * is not the message, as a queue file's envelope follows its data; sets
 * e's size to the data's; returns it open for reading. */
static int data_file(struct envelope *e, const char *name, const char *data,
                     size_t len)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || !write_all(fd, data, len) ||
        !write_all(fd, AFTER_DATA, strlen(AFTER_DATA)))
        return -1;
    e->size = len;
    return fd;   /* the offset is at the end: bounce.c must use pread */
}

static void test_envelope(struct envelope *e)
{
    envelope_init(e);
    str_copy(e->id, "0123456789ABCDEF1", sizeof e->id);
    str_copy(e->domain, "example.org", sizeof e->domain);
    str_copy(e->sender, "sender@remote.test", sizeof e->sender);
    str_copy(e->helo, "client.test", sizeof e->helo);
    str_copy(e->client, "192.0.2.1", sizeof e->client);
    e->arrival = 1700000000;
}

/* The DSN as a NUL-terminated heap string (NULL when generation failed). */
static char *make_dsn(const struct envelope *e, int data_fd,
                      const struct bounce_rcpt *r, size_t n)
{
    char path[256];
    snprintf(path, sizeof path, "%s/dsn.out", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return NULL;
    bool ok = bounce_write_dsn(fd, "mx.test", e, data_fd, r, n, 1700000100);
    struct stat st;
    char *buf = NULL;
    if (ok && fstat(fd, &st) == 0 && (buf = malloc((size_t)st.st_size + 1))) {
        ssize_t got = pread(fd, buf, (size_t)st.st_size, 0);
        buf[got > 0 ? got : 0] = '\0';
    }
    close(fd);
    CHECK(!buf || !strstr(buf, "NOT-THE-MESSAGE"));
    return buf;
}

static size_t count(const char *hay, const char *needle)
{
    size_t k = 0, len = strlen(needle);
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p += len)
        k++;
    return k;
}

static bool crlf_only(const char *s)
{
    for (const char *p = s; *p; p++)
        if (*p == '\n' && (p == s || p[-1] != '\r'))
            return false;
    return true;
}

/* The boundary parameter of the top-level Content-Type. */
static bool get_boundary(const char *dsn, char *out, size_t n)
{
    const char *b = strstr(dsn, "boundary=\"");
    if (!b)
        return false;
    b += 10;
    const char *end = strchr(b, '"');
    if (!end || (size_t)(end - b) >= n)
        return false;
    memcpy(out, b, (size_t)(end - b));
    out[end - b] = '\0';
    return true;
}

/* Text of the part number k (1-based), from after its delimiter line up to
 * the next delimiter; heap string. */
static char *part(const char *dsn, const char *boundary, int k)
{
    char delim[256];
    snprintf(delim, sizeof delim, "\r\n--%s", boundary);
    const char *p = dsn;
    for (int i = 0; i < k; i++) {
        p = strstr(p, delim);
        if (!p)
            return NULL;
        p += strlen(delim);
    }
    const char *end = strstr(p, delim);
    if (!end)
        return NULL;
    return strndup(p, (size_t)(end - p));
}

static void test_structure(void)
{
    struct envelope e;
    test_envelope(&e);
    str_copy(e.envid, "abc+2Bdef", sizeof e.envid);
    e.last_attempt = 1700000050;
    int fd = data_file(&e, "m1", MESSAGE, strlen(MESSAGE));
    struct bounce_rcpt r[] = {
        {"u1@example.org", "rfc822;U1+2Bx@example.org", 0, "5.1.1",
         "550 5.1.1 no such user"},
        {"u2@example.org", "", DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY, "5.2.2",
         ""},
    };
    char *dsn = make_dsn(&e, fd, r, 2);
    CHECK(dsn != NULL);
    if (!dsn)
        return;
    CHECK(crlf_only(dsn));
    CHECK(strncmp(dsn, "From: Mail Delivery System <MAILER-DAEMON@mx.test>\r\n",
                  52) == 0);
    CHECK(strstr(dsn, "\r\nTo: <sender@remote.test>\r\n") != NULL);
    CHECK(strstr(dsn, "\r\nSubject: Undelivered Mail Returned to Sender\r\n"));
    CHECK(strstr(dsn, "\r\nAuto-Submitted: auto-replied\r\n") != NULL);
    CHECK(strstr(dsn, "\r\nMIME-Version: 1.0\r\n") != NULL);
    CHECK(strstr(dsn, "\r\nDate: ") != NULL);
    CHECK(strstr(dsn, "\r\nMessage-ID: <0123456789ABCDEF1.bounce.1700000100.")
          != NULL);
    CHECK(strstr(dsn, "@mx.test>\r\n") != NULL);
    CHECK(strstr(dsn, "Content-Type: multipart/report; "
                      "report-type=delivery-status;") != NULL);
    char b[200];
    CHECK(get_boundary(dsn, b, sizeof b));
    CHECK(strstr(b, "0123456789ABCDEF1") != NULL);
    char line[256];
    snprintf(line, sizeof line, "\r\n--%s\r\n", b);
    CHECK(count(dsn, line) == 3);
    snprintf(line, sizeof line, "\r\n--%s--\r\n", b);
    CHECK(count(dsn, line) == 1);
    size_t len = strlen(dsn), llen = strlen(line);
    CHECK(len > llen && strcmp(dsn + len - llen, line) == 0);
    CHECK(strstr(MESSAGE, b) == NULL);

    char *p1 = part(dsn, b, 1), *p2 = part(dsn, b, 2), *p3 = part(dsn, b, 3);
    CHECK(p1 && strstr(p1, "Content-Type: text/plain; charset=us-ascii\r\n"));
    CHECK(p1 && strstr(p1, "<u1@example.org>: 550 5.1.1 no such user\r\n"));
    CHECK(p1 && strstr(p1, "<u2@example.org>: delivery failed (status 5.2.2)"));
    CHECK(p2 && strstr(p2, "Content-Type: message/delivery-status\r\n"));
    CHECK(p2 && strstr(p2, "\r\n\r\nReporting-MTA: dns; mx.test\r\n"));
    CHECK(p2 && strstr(p2, "\r\nOriginal-Envelope-Id: abc+def\r\n"));
    CHECK(p2 && strstr(p2, "\r\nArrival-Date: "));
    CHECK(p2 && strstr(p2, "\r\nReceived-From-MTA: dns; client.test ([192.0.2.1])\r\n"));
    CHECK(p2 && strstr(p2, "\r\n\r\nOriginal-Recipient: rfc822; U1+x@example.org\r\n"
                           "Final-Recipient: rfc822; u1@example.org\r\n"
                           "Action: failed\r\nStatus: 5.1.1\r\n"
                           "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
                           "Last-Attempt-Date: "));
    CHECK(p2 && strstr(p2, "\r\n\r\nFinal-Recipient: rfc822; u2@example.org\r\n"
                           "Action: failed\r\nStatus: 5.2.2\r\n"
                           "Last-Attempt-Date: "));
    CHECK(p2 && count(p2, "Final-Recipient:") == 2);
    CHECK(p2 && count(p2, "Diagnostic-Code:") == 1);
    CHECK(p3 && strstr(p3, "Content-Type: message/rfc822\r\n"));
    /* The original, byte for byte, after the part's header section. */
    CHECK(p3 && strstr(p3, "\r\n\r\n" MESSAGE) != NULL);
    CHECK(p3 && strlen(strstr(p3, "\r\n\r\n" MESSAGE)) == strlen(MESSAGE) + 4);
    free(p1);
    free(p2);
    free(p3);
    free(dsn);
    close(fd);
    envelope_free(&e);
}

static void test_ret_hdrs(void)
{
    struct envelope e;
    test_envelope(&e);
    e.ret = RET_HDRS;
    int fd = data_file(&e, "m2", MESSAGE, strlen(MESSAGE));
    struct bounce_rcpt r[] = {{"u1@example.org", "", 0, "5.1.1", ""}};
    char *dsn = make_dsn(&e, fd, r, 1);
    CHECK(dsn != NULL);
    CHECK(dsn && strstr(dsn, "Content-Type: text/rfc822-headers\r\n"));
    CHECK(dsn && strstr(dsn, "\r\nSubject: Hello\r\n"));
    CHECK(dsn && strstr(dsn, "Subject: Hello\r\n\r\n--"));
    CHECK(dsn && !strstr(dsn, "SECRET-BODY"));
    CHECK(dsn && !strstr(dsn, "message/rfc822"));
    CHECK(dsn && strstr(dsn, "then the header section of your message"));
    free(dsn);
    close(fd);
    envelope_free(&e);
}

/* RET=HDRS where the empty line ending the header section straddles a
 * read-chunk boundary (64 KB), at several offsets. */
static void test_ret_hdrs_chunk_edges(void)
{
    struct envelope e;
    test_envelope(&e);
    e.ret = RET_HDRS;
    struct bounce_rcpt r[] = {{"u1@example.org", "", 0, "5.1.1", ""}};
    for (size_t end = 65530; end <= 65538; end++) {
        /* "X: aaaa...\r\n" of total length end, then "\r\nBODY\r\n" */
        size_t total = end + 8;
        char *msg = malloc(total + 1);
        memcpy(msg, "X: ", 3);
        memset(msg + 3, 'a', end - 5);
        memcpy(msg + end - 2, "\r\n\r\nBODY\r\n", 10);
        msg[total] = '\0';
        int fd = data_file(&e, "m3", msg, total);
        char *dsn = make_dsn(&e, fd, r, 1);
        CHECK(dsn && !strstr(dsn, "BODY\r\n"));
        CHECK(dsn && strstr(dsn, "aaaa\r\n\r\n--"));
        free(dsn);
        free(msg);
        close(fd);
    }
    /* A header section without an empty line: all of it. */
    int fd = data_file(&e, "m4", "Subject: x\r\n", 12);
    char *dsn = make_dsn(&e, fd, r, 1);
    CHECK(dsn && strstr(dsn, "\r\n\r\nSubject: x\r\n\r\n--"));
    free(dsn);
    close(fd);
    envelope_free(&e);
}

static void test_notify(void)
{
    struct bounce_rcpt never = {"a@x.test", "", DSN_NOTIFY_NEVER, "5.1.1", ""};
    struct bounce_rcpt success = {"b@x.test", "", DSN_NOTIFY_SUCCESS, "5.1.1", ""};
    struct bounce_rcpt failure = {"c@x.test", "", DSN_NOTIFY_FAILURE, "5.1.1", ""};
    struct bounce_rcpt fd_ = {"d@x.test", "", DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY,
                              "5.1.1", ""};
    struct bounce_rcpt dflt = {"e@x.test", "", 0, "5.1.1", ""};
    CHECK(!bounce_wants_notice(&never));
    CHECK(!bounce_wants_notice(&success));
    CHECK(bounce_wants_notice(&failure));
    CHECK(bounce_wants_notice(&fd_));
    CHECK(bounce_wants_notice(&dflt));

    struct envelope e;
    test_envelope(&e);
    int fd = data_file(&e, "m5", MESSAGE, strlen(MESSAGE));
    struct bounce_rcpt mixed[] = {never, failure, success, dflt};
    char *dsn = make_dsn(&e, fd, mixed, 4);
    CHECK(dsn && !strstr(dsn, "a@x.test"));
    CHECK(dsn && !strstr(dsn, "b@x.test"));
    CHECK(dsn && strstr(dsn, "Final-Recipient: rfc822; c@x.test\r\n"));
    CHECK(dsn && strstr(dsn, "Final-Recipient: rfc822; e@x.test\r\n"));
    free(dsn);

    /* Nobody wants one: no DSN at all. */
    struct bounce_rcpt none[] = {never, success};
    CHECK(make_dsn(&e, fd, none, 2) == NULL);
    struct odmrd_conf conf;
    conf_defaults(&conf);
    str_copy(conf.hostname, "mx.test", sizeof conf.hostname);
    snprintf(conf.accounts_db, sizeof conf.accounts_db, "%s/none.db", dir);
    struct queue q;
    char err[256];
    CHECK(queue_open(&q, dir, err, sizeof err));
    CHECK(bounce_message(&conf, &q, &e, fd, none, 2) == BOUNCE_NOT_NEEDED);

    /* Never a bounce for the null sender. */
    e.sender[0] = '\0';
    struct bounce_rcpt one[] = {failure};
    CHECK(bounce_message(&conf, &q, &e, fd, one, 1) == BOUNCE_NOT_NEEDED);
    close(fd);
    envelope_free(&e);
}

/* Fields from the envelope cannot break out of their line. */
static void test_sanitising(void)
{
    struct envelope e;
    test_envelope(&e);
    str_copy(e.envid, "x+0D+0ABcc:+20evil@x.test", sizeof e.envid);
    int fd = data_file(&e, "m6", MESSAGE, strlen(MESSAGE));
    struct bounce_rcpt r[] = {
        {"u1@example.org", "rfc822;a+0D+0AX-Injected:+20yes", 0, "5.1.1",
         "550 5.1.1 bad\r\nX-Evil: 1"},
        {"u2@example.org", "", 0, "4.4.7",
         "delivery time expired (message was queued for 5 days)"},
    };
    char *dsn = make_dsn(&e, fd, r, 2);
    CHECK(dsn != NULL);
    CHECK(dsn && crlf_only(dsn));
    CHECK(dsn && strstr(dsn, "\r\nOriginal-Envelope-Id: x??Bcc: evil@x.test\r\n"));
    CHECK(dsn && !strstr(dsn, "\r\nBcc:"));
    CHECK(dsn && !strstr(dsn, "\r\nX-Injected:"));
    CHECK(dsn && !strstr(dsn, "\r\nX-Evil:"));
    CHECK(dsn && strstr(dsn, "Diagnostic-Code: smtp; 550 5.1.1 bad??X-Evil: 1\r\n"));
    CHECK(dsn && strstr(dsn, "Status: 4.4.7\r\nDiagnostic-Code: x-odmr; "
                             "delivery time expired (message was queued for "
                             "5 days)\r\n"));
    /* Without last_attempt there is no Last-Attempt-Date. */
    CHECK(dsn && !strstr(dsn, "Last-Attempt-Date:"));
    free(dsn);
    close(fd);
    envelope_free(&e);
}

static void test_smtputf8(void)
{
    struct envelope e;
    test_envelope(&e);
    e.smtputf8 = true;
    str_copy(e.sender, "j\xc3\xb6rg@remote.test", sizeof e.sender);
    int fd = data_file(&e, "m7", MESSAGE, strlen(MESSAGE));
    struct bounce_rcpt r[] = {{"b\xc3\xa4r@example.org", "", 0, "5.1.1", ""}};
    char *dsn = make_dsn(&e, fd, r, 1);
    CHECK(dsn && strstr(dsn, "report-type=global-delivery-status"));
    CHECK(dsn && strstr(dsn, "Content-Type: message/global-delivery-status\r\n"));
    CHECK(dsn && strstr(dsn, "Content-Type: message/global\r\n"));
    CHECK(dsn && strstr(dsn, "To: <j\xc3\xb6rg@remote.test>\r\n"));
    CHECK(dsn && strstr(dsn, "Final-Recipient: utf-8; b\xc3\xa4r@example.org\r\n"));
    CHECK(dsn && strstr(dsn, "charset=utf-8"));
    free(dsn);
    /* Without SMTPUTF8, 8-bit bytes never reach the report. */
    e.smtputf8 = false;
    dsn = make_dsn(&e, fd, r, 1);
    CHECK(dsn && strstr(dsn, "Final-Recipient: rfc822; b??r@example.org\r\n"));
    free(dsn);
    close(fd);
    envelope_free(&e);
}

static void test_no_data(void)
{
    struct envelope e;
    test_envelope(&e);
    struct bounce_rcpt r[] = {{"u1@example.org", "", 0, "4.4.7", ""}};
    char *dsn = make_dsn(&e, -1, r, 1);
    char b[200];
    CHECK(dsn && get_boundary(dsn, b, sizeof b));
    char line[256];
    snprintf(line, sizeof line, "\r\n--%s\r\n", b);
    CHECK(dsn && count(dsn, line) == 2);
    CHECK(dsn && !strstr(dsn, "message/rfc822"));
    free(dsn);
    envelope_free(&e);
}

static void test_age(void)
{
    char buf[32];
    bounce_format_age(5 * 86400, buf, sizeof buf);
    CHECK_STR(buf, "5 days");
    bounce_format_age(86400 + 3600, buf, sizeof buf);
    CHECK_STR(buf, "1 day");
    bounce_format_age(7205, buf, sizeof buf);
    CHECK_STR(buf, "2 hours");
    bounce_format_age(90, buf, sizeof buf);
    CHECK_STR(buf, "1 minute");
    bounce_format_age(3, buf, sizeof buf);
    CHECK_STR(buf, "3 seconds");
    bounce_format_age(1, buf, sizeof buf);
    CHECK_STR(buf, "1 second");
    bounce_format_age(0, buf, sizeof buf);
    CHECK_STR(buf, "0 seconds");
}

/* A message that a customer without 8BITMIME cannot take (delivery.c):
 * 5.6.3 with odmrd's own diagnostic, the 8-bit original returned as it
 * is, labelled 8bit. */
static void test_conversion_status(void)
{
    static const char m[] = "From: <sender@remote.test>\r\n"
                            "Subject: Gr\xc3\xbc\xc3\x9f""e\r\n\r\nbody\r\n";
    static const char diag[] = "the receiving site does not support 8BITMIME "
                               "and the message cannot be converted to 7 bit: "
                               "8-bit octets in header text";
    struct envelope e;
    test_envelope(&e);
    e.body = BODY_8BITMIME;
    int fd = data_file(&e, "m9", m, strlen(m));
    struct bounce_rcpt r[] = {{"u1@example.org", "", 0,
                               BOUNCE_STATUS_NO_CONVERSION, diag}};
    char *dsn = make_dsn(&e, fd, r, 1);
    CHECK(dsn != NULL);
    if (dsn) {
        CHECK(strstr(dsn, "\r\nStatus: 5.6.3\r\nDiagnostic-Code: x-odmr; "
                          "the receiving site does not support 8BITMIME") != NULL);
        CHECK(strstr(dsn, "<u1@example.org>: the receiving site") != NULL);
        CHECK(strstr(dsn, "Content-Type: message/rfc822\r\n"
                          "Content-Transfer-Encoding: 8bit\r\n\r\n") != NULL);
        CHECK(strstr(dsn, m) != NULL);
    }
    free(dsn);
    close(fd);
    envelope_free(&e);
}

static int collect_id(void *ctx, const char *id)
{
    str_copy(ctx, id, QID_MAX);
    return 0;
}

/* No relay (or a dead one): queued for a hosted sender domain, logged for
 * any other. */
static void test_fallback(void)
{
    char spool[256], err[256];
    snprintf(spool, sizeof spool, "%s/spool", dir);
    struct queue q;
    CHECK(queue_open(&q, spool, err, sizeof err));
    struct odmrd_conf conf;
    conf_defaults(&conf);
    str_copy(conf.hostname, "mx.test", sizeof conf.hostname);
    str_copy(conf.spool_dir, spool, sizeof conf.spool_dir);
    snprintf(conf.accounts_db, sizeof conf.accounts_db, "%s/acct.db", dir);
    CHECK(accounts_user_add(conf.accounts_db, "bob", "pw") == ACCT_OK);
    CHECK(accounts_domain_add(conf.accounts_db, "remote.test", "bob") == ACCT_OK);

    struct envelope e;
    test_envelope(&e);
    str_copy(e.sender, "sender@Remote.TEST", sizeof e.sender);
    int fd = data_file(&e, "m8", MESSAGE, strlen(MESSAGE));
    struct bounce_rcpt r[] = {{"u1@example.org", "", 0, "5.0.0",
                               "returned to sender by the administrator"}};
    CHECK(bounce_message(&conf, &q, &e, fd, r, 1) == BOUNCE_QUEUED);
    char id[QID_MAX] = "";
    CHECK(queue_ids(&q, "remote.test", collect_id, id) == 1);
    struct envelope b;
    envelope_init(&b);
    CHECK(queue_load(&q, "remote.test", id, &b, err, sizeof err));
    CHECK_STR(b.sender, "");
    CHECK(b.nrcpt == 1 && !strcmp(b.rcpt[0].addr, "sender@Remote.TEST"));
    int bfd = queue_open_data(&q, "remote.test", id);
    char head[4096] = "";
    ssize_t got = bfd >= 0 ? pread(bfd, head, sizeof head - 1, 0) : -1;
    head[got > 0 ? got : 0] = '\0';
    CHECK(strstr(head, "report-type=delivery-status") != NULL);
    CHECK(strstr(head, "Final-Recipient: rfc822; u1@example.org") != NULL);
    if (bfd >= 0)
        close(bfd);
    envelope_free(&b);

    /* A relay that refuses the connection: the same fallback. */
    str_copy(conf.bounce_relay_host, "127.0.0.1", sizeof conf.bounce_relay_host);
    str_copy(conf.bounce_relay_port, "1", sizeof conf.bounce_relay_port);
    conf.timeout = 5;
    CHECK(bounce_message(&conf, &q, &e, fd, r, 1) == BOUNCE_QUEUED);

    /* A foreign sender: only a log line. */
    str_copy(e.sender, "someone@elsewhere.test", sizeof e.sender);
    CHECK(bounce_message(&conf, &q, &e, fd, r, 1) == BOUNCE_LOGGED);
    conf.bounce_relay_host[0] = '\0';
    CHECK(bounce_message(&conf, &q, &e, fd, r, 1) == BOUNCE_LOGGED);
    CHECK(queue_ids(&q, "elsewhere.test", collect_id, id) == 0);
    close(fd);
    envelope_free(&e);
}

int main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_structure();
    test_ret_hdrs();
    test_ret_hdrs_chunk_edges();
    test_notify();
    test_sanitising();
    test_smtputf8();
    test_no_data();
    test_age();
    test_conversion_status();
    test_fallback();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        printf("note: could not remove %s\n", dir);
    CHECK_DONE();
}
