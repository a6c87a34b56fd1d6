/* test_milter.c - unit tests for server/milter.c, the milter wire format,
 * and server/milter_edit.c, which applies the milters' changes.  Both are
 * part of odmrd only (not of the library the unit tests link), so they are
 * compiled into this test directly. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../server/milter.h"
#include "check.h"

/* The wire's 4-byte network-order length (the test builds packets). */
static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static char err[256];

/* Builds cmd + data into pkt; returns its length. */
static size_t pkt_of(uint8_t *pkt, char cmd, const void *data, size_t len)
{
    pkt[0] = (uint8_t)cmd;
    memcpy(pkt + 1, data, len);
    return len + 1;
}

static void test_frame(void)
{
    uint8_t buf[16];
    size_t total = 0;
    milter_packet_head(buf, 'c', 0);
    CHECK(buf[0] == 0 && buf[3] == 1 && buf[4] == 'c');
    CHECK(milter_frame(buf, 3, &total, err, sizeof err) == 0);
    CHECK(milter_frame(buf, 4, &total, err, sizeof err) == 0);
    CHECK(milter_frame(buf, 5, &total, err, sizeof err) == 1 && total == 5);
    memset(buf, 0, 4);
    CHECK(milter_frame(buf, 5, &total, err, sizeof err) == -1);
    put32(buf, MILTER_PACKET_MAX + 1);
    CHECK(milter_frame(buf, 5, &total, err, sizeof err) == -1);
    put32(buf, 0xffffffffu);
    CHECK(milter_frame(buf, 16, &total, err, sizeof err) == -1);
    put32(buf, MILTER_PACKET_MAX);
    CHECK(milter_frame(buf, 16, &total, err, sizeof err) == 0);
}

static void test_optneg(void)
{
    uint8_t d[64];
    struct milter_neg neg;
    bool masked;
    milter_optneg_request(d, 6, SMFIF_ADDHDRS | SMFIF_CHGHDRS,
                          SMFIP_NOCONNECT | SMFIP_NR_HDR);
    CHECK(milter_parse_optneg(d, 12, 6, &neg, &masked, err, sizeof err));
    CHECK(neg.version == 6 && !masked);
    CHECK(neg.actions == (SMFIF_ADDHDRS | SMFIF_CHGHDRS));
    CHECK(neg.steps == (SMFIP_NOCONNECT | SMFIP_NR_HDR));
    CHECK(!milter_parse_optneg(d, 11, 6, &neg, &masked, err, sizeof err));
    milter_optneg_request(d, 7, 0, 0);
    CHECK(!milter_parse_optneg(d, 12, 6, &neg, &masked, err, sizeof err));
    milter_optneg_request(d, 1, 0, 0);
    CHECK(!milter_parse_optneg(d, 12, 6, &neg, &masked, err, sizeof err));
    milter_optneg_request(d, 6, 0, 0);
    CHECK(!milter_parse_optneg(d, 12, 5, &neg, &masked, err, sizeof err));
    /* actions odmrd never offered are masked off */
    milter_optneg_request(d, 6, 0x1000u | SMFIF_ADDHDRS, 0x40000000u);
    CHECK(milter_parse_optneg(d, 12, 6, &neg, &masked, err, sizeof err));
    CHECK(masked && neg.actions == SMFIF_ADDHDRS && neg.steps == 0);
    /* a macro list: stage 2, "{mail_addr}" */
    milter_optneg_request(d, 6, 0, 0);
    put32(d + 12, 2);
    memcpy(d + 16, "{mail_addr}", 12);
    CHECK(milter_parse_optneg(d, 28, 6, &neg, &masked, err, sizeof err));
    CHECK(!milter_parse_optneg(d, 27, 6, &neg, &masked, err, sizeof err));
    put32(d + 12, 9);
    CHECK(!milter_parse_optneg(d, 28, 6, &neg, &masked, err, sizeof err));
}

static void test_simple_replies(void)
{
    uint8_t p[64];
    struct milter_reply r;
    const char *simple = "acdrtsp";
    for (const char *c = simple; *c; c++) {
        CHECK(milter_parse_reply(p, pkt_of(p, *c, "", 0), &r, err, sizeof err));
        CHECK(r.cmd == *c);
        CHECK(!milter_parse_reply(p, pkt_of(p, *c, "x", 1), &r, err, sizeof err));
    }
    CHECK(milter_reply_final('a') && milter_reply_final('y') &&
          milter_reply_final('s'));
    CHECK(!milter_reply_final('h') && !milter_reply_final('p') &&
          !milter_reply_final('\0'));
    CHECK(!milter_parse_reply(p, 0, &r, err, sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'Z', "", 0), &r, err, sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'e', "a", 1), &r, err, sizeof err));
}

static void test_replycode(void)
{
    uint8_t p[256];
    struct milter_reply r;
    CHECK(milter_parse_reply(p, pkt_of(p, 'y', "554 5.7.1 Gtube pattern", 24),
                             &r, err, sizeof err));
    CHECK_STR(r.text, "554 5.7.1 Gtube pattern");
    CHECK(!milter_parse_reply(p, pkt_of(p, 'y', "554 no nul", 10), &r, err,
                              sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'y', "250 ok", 7), &r, err, sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'y', "55 x", 5), &r, err, sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'y', "554 a\0b", 8), &r, err,
                              sizeof err));
    CHECK(milter_check_replycode("451", err, sizeof err) == 451);
    CHECK(milter_check_replycode("550-5.7.1 one\r\n550-5.7.1 two\r\n550 5.7.1 end",
                                 err, sizeof err) == 550);
    CHECK(milter_check_replycode("550-one\r\n551 two", err, sizeof err) == 0);
    CHECK(milter_check_replycode("550-one", err, sizeof err) == 0);
    CHECK(milter_check_replycode("550 one\r\n550 two", err, sizeof err) == 0);
    CHECK(milter_check_replycode("550 one\r\n", err, sizeof err) == 0);
    CHECK(milter_check_replycode("550 bare\nlf", err, sizeof err) == 0);
    CHECK(milter_check_replycode("550x", err, sizeof err) == 0);
    CHECK(milter_check_replycode("", err, sizeof err) == 0);
}

static void test_headers(void)
{
    uint8_t p[256];
    struct milter_reply r;
    CHECK(milter_parse_reply(p, pkt_of(p, 'h', "X-Spam\0yes\0", 11), &r, err,
                             sizeof err));
    CHECK_STR(r.name, "X-Spam");
    CHECK_STR(r.value, "yes");
    CHECK(!milter_parse_reply(p, pkt_of(p, 'h', "X-Spam\0yes", 10), &r, err,
                              sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'h', "X-Spam\0yes\0z", 12), &r, err,
                              sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'h', "X:S\0yes\0", 8), &r, err,
                              sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'h', "\0yes\0", 5), &r, err,
                              sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'h', "X\0a\nb\0", 6), &r, err,
                              sizeof err));
    CHECK(milter_parse_reply(p, pkt_of(p, 'h', "X\0a\n\tb\0", 7), &r, err,
                             sizeof err));
    /* a continuation of blanks alone, a bare CR, other control octets */
    CHECK(!milter_header_value_ok("X", "a\n \nX-Injected: 1"));
    CHECK(!milter_header_value_ok("X", "a\n\t"));
    CHECK(!milter_header_value_ok("X", "a\rb"));
    CHECK(!milter_header_value_ok("X", "a\x01b"));
    CHECK(!milter_header_value_ok("X", "a\x7f"));
    CHECK(milter_header_value_ok("X", "caf\xc3\xa9\r\n\tb"));
    CHECK(milter_header_value_ok("X", ""));
    char long_line[1001];
    memset(long_line, 'a', 996);
    long_line[996] = '\0';            /* "X: " + 996 = 999 on the line */
    CHECK(!milter_header_value_ok("X", long_line));
    long_line[995] = '\0';
    CHECK(milter_header_value_ok("X", long_line));
    CHECK(milter_parse_reply(p, pkt_of(p, 'm', "\0\0\0\2Subject\0\0", 13), &r,
                             err, sizeof err));
    CHECK(r.index == 2 && !strcmp(r.name, "Subject") && !r.value[0]);
    CHECK(milter_parse_reply(p, pkt_of(p, 'i', "\0\0\0\0X-A\0v\0", 10), &r, err,
                             sizeof err));
    CHECK(r.index == 0);
    CHECK(!milter_parse_reply(p, pkt_of(p, 'i', "\0\0\0", 3), &r, err,
                              sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, 'm', "\0\0\0\1X", 5), &r, err,
                              sizeof err));
}

static void test_recipients_body(void)
{
    uint8_t p[256];
    struct milter_reply r;
    CHECK(milter_parse_reply(p, pkt_of(p, '+', "<a@b>\0", 6), &r, err, sizeof err));
    CHECK_STR(r.text, "<a@b>");
    CHECK(milter_parse_reply(p, pkt_of(p, '-', "<a@b>\0", 6), &r, err, sizeof err));
    CHECK(!milter_parse_reply(p, pkt_of(p, '-', "<a@b>", 5), &r, err, sizeof err));
    CHECK(milter_parse_reply(p, pkt_of(p, '2', "<a@b>\0NOTIFY=NEVER\0", 19), &r,
                             err, sizeof err));
    CHECK(!strcmp(r.text, "<a@b>") && !strcmp(r.value, "NOTIFY=NEVER"));
    CHECK(milter_parse_reply(p, pkt_of(p, 'q', "spam\0", 5), &r, err, sizeof err));
    CHECK_STR(r.text, "spam");
    CHECK(milter_parse_reply(p, pkt_of(p, 'b', "new\r\nbody", 9), &r, err,
                             sizeof err));
    CHECK(r.len == 9 && !memcmp(r.data, "new\r\nbody", 9));
    CHECK(milter_parse_reply(p, pkt_of(p, 'b', "", 0), &r, err, sizeof err));
    CHECK(r.len == 0);
}

static void test_put_str(void)
{
    uint8_t out[8];
    size_t len = 0;
    CHECK(milter_put_str(out, sizeof out, &len, "abc") && len == 4);
    CHECK(milter_put_str(out, sizeof out, &len, "def") && len == 8);
    CHECK(!milter_put_str(out, sizeof out, &len, "") && len == 8);
    CHECK(!memcmp(out, "abc\0def\0", 8));
}

/* ------------------------------------------------------ milter_rewrite */

struct sink {
    char buf[4096];
    size_t len;
};

static void sink_write(void *ctx, const void *data, size_t len)
{
    struct sink *k = ctx;
    if (k->len + len < sizeof k->buf) {
        memcpy(k->buf + k->len, data, len);
        k->len += len;
        k->buf[k->len] = '\0';
    }
}

static const char ORIGINAL[] =
    "Received: by us\r\n"
    "Subject: one\r\n"
    "X-A: 1\r\n"
    "X-A: 2\r\n\tfolded\r\n"
    "\r\n"
    "body\r\n";

/* Rewrites ORIGINAL with the edits into k; false on failure. */
static bool rewrite(struct milter_edits *e, struct sink *k)
{
    char path[] = "/tmp/test_milter.XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        return false;
    unlink(path);
    bool ok = write(fd, ORIGINAL, sizeof ORIGINAL - 1) ==
              (ssize_t)(sizeof ORIGINAL - 1);
    struct milter_span hdrs[] = {{17, 14}, {31, 8}, {39, 17}};
    struct milter_original o = {fd, 17, hdrs, 3, 56, sizeof ORIGINAL - 1};
    char why[256];
    k->len = 0;
    k->buf[0] = '\0';
    ok = ok && milter_rewrite(&o, e, sink_write, k, why, sizeof why);
    close(fd);
    return ok;
}

static void test_rewrite_headers(void)
{
    struct milter_header_edit h[] = {
        {SMFIR_CHGHEADER, 2, "x-a", "", false},        /* the second X-A goes */
        {SMFIR_INSHEADER, 0, "X-Top", "t", false},
        {SMFIR_CHGHEADER, 1, "Subject", "two\n\tlines", false},
        {SMFIR_ADDHEADER, 0, "X-End", " e", true},      /* value as sent */
        {SMFIR_CHGHEADER, 3, "X-A", "", false},         /* none: nothing */
        {SMFIR_CHGHEADER, 1, "X-New", "n", false},      /* none: added */
    };
    struct milter_edits e = {.headers = h, .nheaders = 6, .body_fd = -1};
    struct sink k;
    CHECK(rewrite(&e, &k));
    CHECK_STR(k.buf, "Received: by us\r\n"
                     "X-Top: t\r\n"
                     "Subject: two\r\n\tlines\r\n"
                     "X-A: 1\r\n"
                     "X-End: e\r\n"
                     "X-New: n\r\n"
                     "\r\n"
                     "body\r\n");
    struct milter_edits none = {.body_fd = -1};
    CHECK(rewrite(&none, &k));
    CHECK_STR(k.buf, ORIGINAL);
}

static void test_rewrite_body(void)
{
    char path[] = "/tmp/test_milter_body.XXXXXX";
    int fd = mkstemp(path);
    unlink(path);
    CHECK(fd >= 0 && write(fd, "new\r\nlast", 9) == 9);
    struct milter_edits e = {.body_fd = fd, .body_size = 9};
    struct sink k;
    CHECK(rewrite(&e, &k));
    CHECK_STR(k.buf, "Received: by us\r\nSubject: one\r\nX-A: 1\r\n"
                     "X-A: 2\r\n\tfolded\r\n\r\nnew\r\nlast\r\n");
    e.body_size = 0;
    CHECK(rewrite(&e, &k));
    CHECK(k.len > 2 && !strcmp(k.buf + k.len - 4, "\r\n\r\n"));
    close(fd);
}

/* SMFIR_CHGFROM and SMFIR_ADDRCPT_PAR: the packets and their args. */
static void test_sender_and_rcpt_args(void)
{
    uint8_t pkt[128];
    struct milter_reply r;
    struct mail_args m;
    char ign[64], out[256];
    size_t len = pkt_of(pkt, SMFIR_CHGFROM, "<a@b.test>\0RET=HDRS\0", 20);
    CHECK(milter_parse_reply(pkt, len, &r, err, sizeof err));
    CHECK_STR(r.text, "<a@b.test>");
    CHECK_STR(r.value, "RET=HDRS");
    len = pkt_of(pkt, SMFIR_CHGFROM, "<a@b.test>", 10);   /* no NUL */
    CHECK(!milter_parse_reply(pkt, len, &r, err, sizeof err));

    CHECK(milter_parse_chgfrom("x@b.test", "SIZE=5 BODY=8BITMIME X-Y=1 ENVID=q",
                               false, &m, ign, sizeof ign, err, sizeof err));
    CHECK_STR(m.from.local, "x");
    CHECK(m.body == BODY_8BITMIME && m.size == 0 && !strcmp(m.envid, "q"));
    CHECK_STR(ign, " X-Y=1");
    CHECK(milter_parse_chgfrom("<>", NULL, false, &m, ign, sizeof ign, err,
                               sizeof err) && m.from.null && !ign[0]);
    CHECK(!milter_parse_chgfrom("", NULL, false, &m, ign, sizeof ign, err,
                                sizeof err));
    CHECK(!milter_parse_chgfrom("<a b@c>", NULL, false, &m, ign, sizeof ign,
                                err, sizeof err));
    CHECK(!milter_parse_chgfrom("<a@b.test>", "RET=SOME", false, &m, ign,
                                sizeof ign, err, sizeof err));
    CHECK(!milter_parse_chgfrom("<j\xc3\xb6@b.test>", NULL, false, &m, ign,
                                sizeof ign, err, sizeof err));
    CHECK(milter_parse_chgfrom("<j\xc3\xb6@b.test>", "SMTPUTF8", false, &m, ign,
                               sizeof ign, err, sizeof err) && m.smtputf8);
    CHECK(milter_parse_chgfrom("<j\xc3\xb6@b.test>", NULL, true, &m, ign,
                               sizeof ign, err, sizeof err));

    CHECK(milter_rcpt_with_args("a@b.test", " NOTIFY=NEVER  ORCPT=rfc822;a@b "
                                "NOTIFY=SUCCESS FOO", out, sizeof out, ign,
                                sizeof ign));
    CHECK_STR(out, "<a@b.test> NOTIFY=NEVER ORCPT=rfc822;a@b");
    CHECK_STR(ign, " NOTIFY=SUCCESS FOO");
    CHECK(milter_rcpt_with_args("<a@b.test>", "NOTIFY=MAYBE", out, sizeof out,
                                ign, sizeof ign));
    CHECK_STR(out, "<a@b.test>");
    CHECK_STR(ign, " NOTIFY=MAYBE");
    CHECK(!milter_rcpt_with_args("a@b.test", NULL, out, 8, ign, sizeof ign));
}

int main(void)
{
    test_frame();
    test_optneg();
    test_simple_replies();
    test_replycode();
    test_headers();
    test_recipients_body();
    test_put_str();
    test_sender_and_rcpt_args();
    test_rewrite_headers();
    test_rewrite_body();
    CHECK_DONE();
}
