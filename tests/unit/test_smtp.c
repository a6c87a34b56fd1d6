/* test_smtp.c - unit tests for common/smtp.c: commands, MAIL/RCPT
 * arguments with ESMTP parameters, xtext and multi-line replies. */
#include <stdint.h>
#include <stdlib.h>

#include "../../common/smtp.h"
#include "check.h"

static struct mail_args ma;
static struct rcpt_args ra;
static struct smtp_err err;

/* ---- commands ---- */

static void cmd(const char *line, enum smtp_verb verb, const char *arg)
{
    struct smtp_cmd c;

    smtp_cmd_parse(line, &c);
    CHECK(c.verb == verb);
    if (c.verb != verb)
        printf("  line: %s\n", line);
    if (arg == NULL)
        CHECK(c.arg == NULL);
    else
        CHECK_STR(c.arg, arg);
}

static void test_commands(void)
{
    cmd("EHLO client.example", SMTP_EHLO, "client.example");
    cmd("ehlo client.example", SMTP_EHLO, "client.example");
    cmd("eHlO   x", SMTP_EHLO, "x");
    cmd("HELO x", SMTP_HELO, "x");
    cmd("LHLO x", SMTP_LHLO, "x");
    cmd("QUIT", SMTP_QUIT, "");
    cmd("quit", SMTP_QUIT, "");
    cmd("QUIT ", SMTP_QUIT, "");
    cmd("DATA", SMTP_DATA, "");
    cmd("BDAT 100 LAST", SMTP_BDAT, "100 LAST");
    cmd("RSET", SMTP_RSET, "");
    cmd("NOOP hello", SMTP_NOOP, "hello");
    cmd("HELP", SMTP_HELP, "");
    cmd("VRFY user", SMTP_VRFY, "user");
    cmd("EXPN list", SMTP_EXPN, "list");
    cmd("STARTTLS", SMTP_STARTTLS, "");
    cmd("starttls", SMTP_STARTTLS, "");
    cmd("AUTH CRAM-MD5", SMTP_AUTH, "CRAM-MD5");
    cmd("AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=", SMTP_AUTH,
        "PLAIN dGVzdAB0ZXN0AHRlc3Q=");
    cmd("ATRN a.example,b.example", SMTP_ATRN, "a.example,b.example");
    cmd("ATRN", SMTP_ATRN, "");
    cmd("ETRN example.com", SMTP_ETRN, "example.com");
    cmd("TURN", SMTP_TURN, "");

    cmd("MAIL FROM:<a@b.c>", SMTP_MAIL, "<a@b.c>");
    cmd("mail from:<a@b.c>", SMTP_MAIL, "<a@b.c>");
    cmd("Mail From: <a@b.c>", SMTP_MAIL, "<a@b.c>");
    cmd("MAIL FROM:   <a@b.c> SIZE=10", SMTP_MAIL, "<a@b.c> SIZE=10");
    cmd("MAIL  FROM:<a@b.c>", SMTP_MAIL, "<a@b.c>");
    cmd("MAIL FROM:", SMTP_MAIL, "");
    cmd("MAIL FROM:<>", SMTP_MAIL, "<>");
    cmd("MAIL", SMTP_MAIL, NULL);
    cmd("MAIL ", SMTP_MAIL, NULL);
    cmd("MAIL FROM", SMTP_MAIL, NULL);
    cmd("MAIL FROM <a@b.c>", SMTP_MAIL, NULL);
    cmd("MAIL FROM :<a@b.c>", SMTP_MAIL, NULL);
    cmd("MAIL TO:<a@b.c>", SMTP_MAIL, NULL);
    cmd("MAIL FRO", SMTP_MAIL, NULL);
    cmd("RCPT TO:<a@b.c>", SMTP_RCPT, "<a@b.c>");
    cmd("rcpt to: <a@b.c> NOTIFY=NEVER", SMTP_RCPT, "<a@b.c> NOTIFY=NEVER");
    cmd("RCPT TO", SMTP_RCPT, NULL);
    cmd("RCPT FROM:<a@b.c>", SMTP_RCPT, NULL);
    cmd("RCPT", SMTP_RCPT, NULL);

    cmd("MAILFROM:<a@b.c>", SMTP_UNKNOWN, "");
    cmd("MAIL:", SMTP_UNKNOWN, "");
    cmd("QUITX", SMTP_UNKNOWN, "");
    cmd("QUI", SMTP_UNKNOWN, "");
    cmd("", SMTP_UNKNOWN, "");
    cmd(" QUIT", SMTP_UNKNOWN, "");
    cmd("QUIT\t", SMTP_UNKNOWN, "");
    cmd("XYZZY foo", SMTP_UNKNOWN, "");
    cmd("GET / HTTP/1.1", SMTP_UNKNOWN, "");
    cmd("STARTTLSSTARTTLSSTARTTLS", SMTP_UNKNOWN, "");
    cmd("\xc3\xa9HLO x", SMTP_UNKNOWN, "");
    cmd("EHLO\x01", SMTP_UNKNOWN, "");
    cmd(NULL, SMTP_UNKNOWN, "");

    CHECK_STR(smtp_verb_name(SMTP_ATRN), "ATRN");
    CHECK_STR(smtp_verb_name(SMTP_MAIL), "MAIL");
    CHECK_STR(smtp_verb_name(SMTP_STARTTLS), "STARTTLS");
    CHECK_STR(smtp_verb_name(SMTP_UNKNOWN), "UNKNOWN");
    CHECK_STR(smtp_verb_name((enum smtp_verb)999), "UNKNOWN");
}

/* ---- MAIL ---- */

static void mail_ok(const char *arg, bool utf8_ok)
{
    bool r = smtp_parse_mail(arg, &ma, utf8_ok, &err);

    CHECK(r);
    if (!r)
        printf("  MAIL arg: %s -> %s\n", arg, err.reply);
    CHECK(err.code == 0 && err.reply[0] == '\0');
}

static void mail_bad(const char *arg, bool utf8_ok, int code,
                     const char *reply)
{
    CHECK(!smtp_parse_mail(arg, &ma, utf8_ok, &err));
    CHECK(err.code == code);
    CHECK_STR(err.reply, reply);
}

static void rcpt_ok(const char *arg, bool utf8_ok)
{
    bool r = smtp_parse_rcpt(arg, &ra, utf8_ok, &err);

    CHECK(r);
    if (!r)
        printf("  RCPT arg: %s -> %s\n", arg, err.reply);
    CHECK(err.code == 0 && err.reply[0] == '\0');
}

static void rcpt_bad(const char *arg, bool utf8_ok, int code,
                     const char *reply)
{
    CHECK(!smtp_parse_rcpt(arg, &ra, utf8_ok, &err));
    CHECK(err.code == code);
    CHECK_STR(err.reply, reply);
}

#define BAD_SENDER "501 5.1.7 Bad sender address syntax"
#define BAD_RCPT "501 5.1.3 Bad recipient address syntax"
#define MAIL_SYNTAX "501 5.5.4 Syntax: MAIL FROM:<address>"
#define RCPT_SYNTAX "501 5.5.4 Syntax: RCPT TO:<address>"
#define NEED_UTF8 "553 5.6.7 Address requires SMTPUTF8"

static void test_mail_address(void)
{
    mail_ok("<a@b.c>", false);
    CHECK_STR(ma.from.local, "a");
    CHECK_STR(ma.from.domain, "b.c");
    CHECK(!ma.from.null);
    CHECK(ma.size == 0 && ma.body == BODY_UNSPEC && ma.ret == RET_UNSPEC);
    CHECK(!ma.smtputf8 && ma.envid[0] == '\0');
    mail_ok("<>", false);
    CHECK(ma.from.null);
    mail_ok("<> ", false);
    mail_ok("<a@b.c>   ", false);
    mail_ok("<@relay.example:a@b.c>", false);
    CHECK_STR(ma.from.local, "a");
    mail_ok("<\"x y\"@[192.0.2.1]>", false);
    CHECK(ma.from.literal);

    mail_bad(NULL, false, 501, MAIL_SYNTAX);
    mail_bad("", false, 501, MAIL_SYNTAX);
    mail_bad("a@b.c", false, 501, MAIL_SYNTAX);
    mail_bad(" <a@b.c>", false, 501, MAIL_SYNTAX);
    mail_bad("SIZE=10", false, 501, MAIL_SYNTAX);
    mail_bad("<a@b.c", false, 501, BAD_SENDER);
    mail_bad("<a@b.c>x", false, 501, BAD_SENDER);
    mail_bad("<a@b.c>SIZE=10", false, 501, BAD_SENDER);
    mail_bad("<a@b.c>>", false, 501, BAD_SENDER);
    mail_bad("<a@b.c>\tSIZE=10", false, 501, BAD_SENDER);
    mail_bad("<a..b@c>", false, 501, BAD_SENDER);
    mail_bad("<a@-b.c>", false, 501, BAD_SENDER);
    mail_bad("<a b@c>", false, 501, BAD_SENDER);
    mail_bad("<\"a@c>", false, 501, BAD_SENDER);
    mail_bad("<a\x01@c>", false, 501, BAD_SENDER);
    mail_bad("<a\xc0\xaf@c>", true, 501, BAD_SENDER);
    mail_bad("<a\xc0\xaf@c> SMTPUTF8", true, 501, BAD_SENDER);
    mail_bad("<@a,u@d>", false, 501, BAD_SENDER);
    mail_bad("<<>>", false, 501, BAD_SENDER);

    {
        char in[1200];
        memset(in, 'x', sizeof in);
        in[0] = '<';
        strcpy(in + 1000, "@b.c>");
        mail_bad(in, false, 501, "501 5.1.7 Address too long");
    }

    /* UTF-8 sender: needs the SMTPUTF8 parameter, which needs utf8_ok */
    mail_bad("<j\xc3\xb6@b.c>", true, 553, NEED_UTF8);
    mail_bad("<j\xc3\xb6@b.c>", false, 553, NEED_UTF8);
    mail_bad("<a@m\xc3\xbcnchen.de> SIZE=10", true, 553, NEED_UTF8);
    mail_ok("<j\xc3\xb6@b.c> SMTPUTF8", true);
    CHECK(ma.smtputf8);
    CHECK_STR(ma.from.local, "j\xc3\xb6");
    mail_ok("<j\xc3\xb6@m\xc3\xbcnchen.de> BODY=8BITMIME smtputf8", true);
    CHECK_STR(ma.from.domain, "m\xc3\xbcnchen.de");
    mail_bad("<j\xc3\xb6@b.c> SMTPUTF8", false, 555,
             "555 5.5.4 Unsupported parameter: SMTPUTF8");
    mail_ok("<a@b.c> SMTPUTF8", true); /* allowed with an ASCII address */
    CHECK(ma.smtputf8);
    mail_bad("<a@b.c> SMTPUTF8", false, 555,
             "555 5.5.4 Unsupported parameter: SMTPUTF8");
    mail_bad("<a@b.c> SMTPUTF8=yes", true, 501,
             "501 5.5.4 Invalid parameter: SMTPUTF8");
    mail_bad("<a@b.c> SMTPUTF8 SMTPUTF8", true, 501,
             "501 5.5.4 Invalid parameter: SMTPUTF8");
}

static void test_mail_params(void)
{
    char in[1200], ev[200];

    mail_ok("<a@b.c> SIZE=12345 BODY=8bitmime RET=hdrs ENVID=QQ+2Bx AUTH=<>",
            false);
    CHECK(ma.size == 12345);
    CHECK(ma.body == BODY_8BITMIME);
    CHECK(ma.ret == RET_HDRS);
    CHECK_STR(ma.envid, "QQ+2Bx");
    mail_ok("<a@b.c>  size=0   body=7BIT  ret=FULL  ", false);
    CHECK(ma.size == 0 && ma.body == BODY_7BIT && ma.ret == RET_FULL);
    mail_ok("<> AUTH=user+40example.com", false);
    mail_ok("<a@b.c> SIZE=00000000000000000001", false); /* 20 digits */
    CHECK(ma.size == 1);

    /* SIZE */
    mail_ok("<a@b.c> SIZE=18446744073709551615", false);
    CHECK(ma.size == UINT64_MAX);
    /* up to 20 digits is valid syntax: too big saturates (then 552) */
    mail_ok("<a@b.c> SIZE=18446744073709551616", false);
    CHECK(ma.size == UINT64_MAX);
    mail_ok("<a@b.c> SIZE=99999999999999999999", false);
    CHECK(ma.size == UINT64_MAX);
    mail_bad("<a@b.c> SIZE=999999999999999999999999999999999", false, 501,
             "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=000000000000000000001", false, 501,
             "501 5.5.4 Invalid parameter: SIZE"); /* 21 digits */
    mail_bad("<a@b.c> SIZE=-1", false, 501, "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=+1", false, 501, "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=10k", false, 501, "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=0x10", false, 501,
             "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=", false, 501, "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE", false, 501, "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=1=2", false, 501,
             "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE==1", false, 501,
             "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=1 SIZE=1", false, 501,
             "501 5.5.4 Invalid parameter: SIZE");
    mail_bad("<a@b.c> SIZE=1 size=2", false, 501,
             "501 5.5.4 Invalid parameter: size");

    /* BODY, RET */
    mail_bad("<a@b.c> BODY=BINARYMIME", false, 501,
             "501 5.5.4 Invalid parameter: BODY");
    mail_bad("<a@b.c> BODY=8BIT", false, 501,
             "501 5.5.4 Invalid parameter: BODY");
    mail_bad("<a@b.c> BODY=8BITMIMEX", false, 501,
             "501 5.5.4 Invalid parameter: BODY");
    mail_bad("<a@b.c> BODY", false, 501, "501 5.5.4 Invalid parameter: BODY");
    mail_bad("<a@b.c> BODY=7BIT BODY=8BITMIME", false, 501,
             "501 5.5.4 Invalid parameter: BODY");
    mail_bad("<a@b.c> RET=NONE", false, 501, "501 5.5.4 Invalid parameter: RET");
    mail_bad("<a@b.c> RET=", false, 501, "501 5.5.4 Invalid parameter: RET");
    mail_bad("<a@b.c> RET=FULL RET=FULL", false, 501,
             "501 5.5.4 Invalid parameter: RET");

    /* ENVID: xtext, at most 100 characters */
    memset(ev, 'e', 100);
    ev[100] = '\0';
    snprintf(in, sizeof in, "<a@b.c> ENVID=%s", ev);
    mail_ok(in, false);
    CHECK(strlen(ma.envid) == 100);
    snprintf(in, sizeof in, "<a@b.c> ENVID=%se", ev);
    mail_bad(in, false, 501, "501 5.5.4 Invalid parameter: ENVID");
    mail_ok("<a@b.c> ENVID=+2B+3D", false);
    CHECK_STR(ma.envid, "+2B+3D");
    mail_bad("<a@b.c> ENVID=a+", false, 501,
             "501 5.5.4 Invalid parameter: ENVID");
    mail_bad("<a@b.c> ENVID=a+2", false, 501,
             "501 5.5.4 Invalid parameter: ENVID");
    mail_bad("<a@b.c> ENVID=a+2b", false, 501,
             "501 5.5.4 Invalid parameter: ENVID");
    mail_bad("<a@b.c> ENVID=a+GG", false, 501,
             "501 5.5.4 Invalid parameter: ENVID");
    mail_bad("<a@b.c> ENVID=a+b", false, 501,
             "501 5.5.4 Invalid parameter: ENVID");
    mail_bad("<a@b.c> ENVID=\xc3\xa9", false, 501,
             "501 5.5.4 Invalid parameter: ENVID");
    mail_bad("<a@b.c> ENVID=", false, 501, "501 5.5.4 Invalid parameter: ENVID");
    mail_bad("<a@b.c> ENVID=x ENVID=y", false, 501,
             "501 5.5.4 Invalid parameter: ENVID");

    /* AUTH: accepted when xtext, ignored */
    mail_ok("<a@b.c> AUTH=<a+2Bb@c>", false);
    mail_bad("<a@b.c> AUTH=", false, 501, "501 5.5.4 Invalid parameter: AUTH");
    mail_bad("<a@b.c> AUTH", false, 501, "501 5.5.4 Invalid parameter: AUTH");
    mail_bad("<a@b.c> AUTH=a+zz", false, 501,
             "501 5.5.4 Invalid parameter: AUTH");
    mail_bad("<a@b.c> AUTH=<> AUTH=<>", false, 501,
             "501 5.5.4 Invalid parameter: AUTH");

    /* unknown and malformed parameters */
    mail_bad("<a@b.c> XFOO=1", false, 555,
             "555 5.5.4 Unsupported parameter: XFOO");
    mail_bad("<a@b.c> XFOO", false, 555,
             "555 5.5.4 Unsupported parameter: XFOO");
    mail_bad("<a@b.c> NOTIFY=NEVER", false, 555,
             "555 5.5.4 Unsupported parameter: NOTIFY");
    mail_bad("<a@b.c> SIZE=1 X-B=2", false, 555,
             "555 5.5.4 Unsupported parameter: X-B");
    mail_bad("<a@b.c> FOO=", false, 501, "501 5.5.4 Invalid parameter: FOO");
    mail_bad("<a@b.c> =", false, 501, "501 5.5.4 Invalid parameter: =");
    mail_bad("<a@b.c> =x", false, 501, "501 5.5.4 Invalid parameter: =x");
    mail_bad("<a@b.c> -FOO", false, 501, "501 5.5.4 Invalid parameter: -FOO");
    mail_bad("<a@b.c> FO!O=1", false, 501, "501 5.5.4 Invalid parameter: FO!O");
    mail_bad("<a@b.c> FO\x01O=1", false, 501,
             "501 5.5.4 Invalid parameter: FO?O");
    mail_bad("<a@b.c> F\xc3\xa9=1", false, 501,
             "501 5.5.4 Invalid parameter: F??");
    mail_bad("<a@b.c> X=\x7f", false, 501, "501 5.5.4 Invalid parameter: X");
    mail_bad("<a@b.c> SIZE=1\t", false, 501,
             "501 5.5.4 Invalid parameter: SIZE");
    /* an invalid keyword is reported before an unknown one later on */
    mail_bad("<a@b.c> FOO= XBAR", false, 501,
             "501 5.5.4 Invalid parameter: FOO");

    /* a long keyword is echoed truncated, the reply stays bounded */
    memset(in, 0, sizeof in);
    strcpy(in, "<a@b.c> ");
    memset(in + 8, 'K', 900);
    CHECK(!smtp_parse_mail(in, &ma, false, &err));
    CHECK(err.code == 555);
    CHECK(strlen(err.reply) < sizeof err.reply);
    CHECK(strncmp(err.reply, "555 5.5.4 Unsupported parameter: KKKK", 37) == 0);
    CHECK(strlen(err.reply) == strlen("555 5.5.4 Unsupported parameter: ") + 40);

    /* parameter count limit */
    mail_bad("<a@b.c> A B C D E F G H I J K L M N O P Q", false, 501,
             "501 5.5.4 Too many parameters");
    mail_bad("<a@b.c> A B C D E F G H I J K L M N O P", false, 555,
             "555 5.5.4 Unsupported parameter: A");
}

/* ---- RCPT ---- */

static void test_rcpt(void)
{
    char in[1200], orcpt[600];

    rcpt_ok("<a@b.c>", false);
    CHECK_STR(ra.to.local, "a");
    CHECK_STR(ra.to.domain, "b.c");
    CHECK(ra.notify == 0 && ra.orcpt[0] == '\0');
    rcpt_ok("<@x,@y:a@b.c> ", false);
    CHECK_STR(ra.to.domain, "b.c");
    rcpt_ok("<\"odd local\"@[IPv6:::1]>", false);

    rcpt_bad("<>", false, 501, BAD_RCPT);
    rcpt_bad("<>", true, 501, BAD_RCPT);
    rcpt_bad(NULL, false, 501, RCPT_SYNTAX);
    rcpt_bad("", false, 501, RCPT_SYNTAX);
    rcpt_bad("a@b.c", false, 501, RCPT_SYNTAX);
    rcpt_bad("<Postmaster>", false, 501, BAD_RCPT);
    rcpt_bad("<a@b.c", false, 501, BAD_RCPT);
    rcpt_bad("<a@b.c>NOTIFY=NEVER", false, 501, BAD_RCPT);
    rcpt_bad("<a@b..c>", false, 501, BAD_RCPT);
    rcpt_bad("<a@b.c\r>", false, 501, BAD_RCPT);
    rcpt_bad("<\xed\xa0\x80@b.c>", true, 501, BAD_RCPT);
    rcpt_bad("<j\xc3\xb6@b.c>", false, 553, NEED_UTF8);
    rcpt_ok("<j\xc3\xb6@b.c>", true);
    CHECK_STR(ra.to.local, "j\xc3\xb6");
    memset(in, 'x', sizeof in);
    in[0] = '<';
    strcpy(in + 300, "@b.c>");
    rcpt_bad(in, false, 501, "501 5.1.3 Address too long");

    /* NOTIFY */
    rcpt_ok("<a@b.c> NOTIFY=NEVER", false);
    CHECK(ra.notify == DSN_NOTIFY_NEVER);
    rcpt_ok("<a@b.c> NOTIFY=SUCCESS,FAILURE,DELAY", false);
    CHECK(ra.notify ==
          (DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY));
    rcpt_ok("<a@b.c> notify=delay,success", false);
    CHECK(ra.notify == (DSN_NOTIFY_SUCCESS | DSN_NOTIFY_DELAY));
    rcpt_ok("<a@b.c> NOTIFY=Failure", false);
    CHECK(ra.notify == DSN_NOTIFY_FAILURE);
    static const char *const bad_notify[] = {
        "NEVER,SUCCESS", "SUCCESS,NEVER", "SUCCESS,SUCCESS", "NEVER,NEVER",
        "SUCCESS,", ",SUCCESS", "SUCCESS,,DELAY", ",", "FOO", "SUCCES",
        "SUCCESSS", "DELAY;FAILURE", "NEVER\x01", "NEVER\xc3\xa9",
    };
    size_t i;
    for (i = 0; i < sizeof bad_notify / sizeof bad_notify[0]; i++) {
        snprintf(in, sizeof in, "<a@b.c> NOTIFY=%s", bad_notify[i]);
        rcpt_bad(in, false, 501, "501 5.5.4 Invalid parameter: NOTIFY");
    }
    rcpt_ok("<a@b.c> NOTIFY=NEVER ", false); /* trailing space is fine */
    rcpt_bad("<a@b.c> NOTIFY=", false, 501,
             "501 5.5.4 Invalid parameter: NOTIFY");
    rcpt_bad("<a@b.c> NOTIFY", false, 501,
             "501 5.5.4 Invalid parameter: NOTIFY");
    rcpt_bad("<a@b.c> NOTIFY=NEVER NOTIFY=NEVER", false, 501,
             "501 5.5.4 Invalid parameter: NOTIFY");

    /* ORCPT */
    rcpt_ok("<a@b.c> ORCPT=rfc822;a@b.c", false);
    CHECK_STR(ra.orcpt, "rfc822;a@b.c");
    rcpt_ok("<a@b.c> ORCPT=RFC822;a+2Bb@c NOTIFY=FAILURE,DELAY", false);
    CHECK_STR(ra.orcpt, "RFC822;a+2Bb@c");
    CHECK(ra.notify == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY));
    rcpt_ok("<a@b.c> ORCPT=utf-8;j\\x{00F6}@b.c", false);
    CHECK_STR(ra.orcpt, "utf-8;j\\x{00F6}@b.c");
    rcpt_ok("<a@b.c> ORCPT=x;y;z", false); /* ';' is an xchar */
    static const char *const bad_orcpt[] = {
        "rfc822", ";a@b.c", "rfc822;", "rfc822;a+zz", "rfc822;a+2",
        "rfc822;a+", "rf(c;x", "rf\"c;x", "rfc822;a\xc3\xb6",
        "rfc822;a\x01", "rfc822;a=b",
    };
    for (i = 0; i < sizeof bad_orcpt / sizeof bad_orcpt[0]; i++) {
        snprintf(in, sizeof in, "<a@b.c> ORCPT=%s", bad_orcpt[i]);
        rcpt_bad(in, false, 501, "501 5.5.4 Invalid parameter: ORCPT");
    }
    rcpt_bad("<a@b.c> ORCPT=", false, 501, "501 5.5.4 Invalid parameter: ORCPT");
    rcpt_bad("<a@b.c> ORCPT=rfc822;a ORCPT=rfc822;a", false, 501,
             "501 5.5.4 Invalid parameter: ORCPT");
    /* ORCPT length: the whole value up to 500 */
    strcpy(orcpt, "rfc822;");
    memset(orcpt + 7, 'o', 493);
    orcpt[500] = '\0';
    snprintf(in, sizeof in, "<a@b.c> ORCPT=%s", orcpt);
    rcpt_ok(in, false);
    CHECK(strlen(ra.orcpt) == SMTP_ORCPT_MAX);
    snprintf(in, sizeof in, "<a@b.c> ORCPT=%so", orcpt);
    rcpt_bad(in, false, 501, "501 5.5.4 Invalid parameter: ORCPT");

    /* unknown parameters and MAIL-only ones */
    rcpt_bad("<a@b.c> SIZE=10", false, 555,
             "555 5.5.4 Unsupported parameter: SIZE");
    rcpt_bad("<a@b.c> SMTPUTF8", true, 555,
             "555 5.5.4 Unsupported parameter: SMTPUTF8");
    rcpt_bad("<a@b.c> FOO=", false, 501, "501 5.5.4 Invalid parameter: FOO");
    rcpt_bad("<a@b.c> =", false, 501, "501 5.5.4 Invalid parameter: =");
    rcpt_bad("<a@b.c> NOTIFY=NEVER =", false, 501,
             "501 5.5.4 Invalid parameter: =");
}

/* ---- xtext ---- */

static void test_xtext(void)
{
    char out[64];

    CHECK(xtext_valid(""));
    CHECK(xtext_valid("abc"));
    CHECK(xtext_valid("a+2Bb"));
    CHECK(xtext_valid("+3D"));
    CHECK(xtext_valid("+41")); /* needless encoding is still valid */
    CHECK(xtext_valid("<>!~"));
    CHECK(!xtext_valid(NULL));
    CHECK(!xtext_valid("a+"));
    CHECK(!xtext_valid("a+2"));
    CHECK(!xtext_valid("a+2b"));
    CHECK(!xtext_valid("a+g0"));
    CHECK(!xtext_valid("+"));
    CHECK(!xtext_valid("++2B"));
    CHECK(!xtext_valid("a=b"));
    CHECK(!xtext_valid("a b"));
    CHECK(!xtext_valid("a\x01"));
    CHECK(!xtext_valid("a\x7f"));
    CHECK(!xtext_valid("\xc3\xa9"));

    CHECK(xtext_decode("a+2Bb", out, sizeof out));
    CHECK_STR(out, "a+b");
    CHECK(xtext_decode("+3D+20x", out, sizeof out));
    CHECK_STR(out, "= x");
    CHECK(xtext_decode("+2b", out, sizeof out)); /* lenient on case */
    CHECK_STR(out, "+");
    CHECK(xtext_decode("+C3+A9", out, sizeof out));
    CHECK_STR(out, "\xc3\xa9");
    CHECK(xtext_decode("", out, sizeof out));
    CHECK_STR(out, "");
    CHECK(!xtext_decode("+00", out, sizeof out));
    CHECK_STR(out, "");
    CHECK(!xtext_decode("ab+", out, sizeof out));
    CHECK_STR(out, "");
    CHECK(!xtext_decode("ab+4", out, sizeof out));
    CHECK(!xtext_decode("ab+4x", out, sizeof out));
    CHECK(!xtext_decode("a b", out, sizeof out));
    CHECK(!xtext_decode("a=b", out, sizeof out));
    CHECK(!xtext_decode(NULL, out, sizeof out));
    CHECK(xtext_decode("abc", out, 4));
    CHECK_STR(out, "abc");
    CHECK(!xtext_decode("abc", out, 3));
    CHECK_STR(out, "");
    CHECK(!xtext_decode("ab+41", out, 3));
    CHECK(xtext_decode("ab+41", out, 4));
    CHECK_STR(out, "abA");
    CHECK(!xtext_decode("a", out, 0));
    CHECK(!xtext_decode("a", NULL, 10));

    CHECK(xtext_encode("a+b=c d", out, sizeof out));
    CHECK_STR(out, "a+2Bb+3Dc+20d");
    CHECK(xtext_valid(out));
    CHECK(xtext_encode("\xc3\xa9\x01\x7f", out, sizeof out));
    CHECK_STR(out, "+C3+A9+01+7F");
    CHECK(xtext_encode("", out, sizeof out));
    CHECK_STR(out, "");
    CHECK(xtext_encode("ab", out, 3));
    CHECK_STR(out, "ab");
    CHECK(!xtext_encode("abc", out, 3));
    CHECK_STR(out, "");
    CHECK(xtext_encode("a+", out, 5));
    CHECK_STR(out, "a+2B");
    CHECK(!xtext_encode("a+", out, 4));
    CHECK_STR(out, "");
    CHECK(!xtext_encode(NULL, out, sizeof out));
    CHECK(!xtext_encode("a", out, 0));
}

/* ---- replies ---- */

static void test_replies(void)
{
    struct smtp_reply r;
    char params[64];
    char big[2200];
    int i, zeros;

    smtp_reply_init(&r);
    CHECK(r.code == 0 && !r.done && r.nlines == 0);
    CHECK(smtp_reply_feed(&r, "250 OK") == 1);
    CHECK(r.code == 250 && r.done && r.nlines == 1);
    CHECK_STR(r.text, "OK");
    CHECK_STR(r.enhanced, "");
    CHECK(smtp_reply_feed(&r, "250 again") == -1); /* already complete */

    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "250 2.1.0 Sender ok") == 1);
    CHECK_STR(r.enhanced, "2.1.0");
    CHECK_STR(r.text, "2.1.0 Sender ok");

    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "550 5.7.1 Relaying denied") == 1);
    CHECK(r.code == 550);
    CHECK_STR(r.enhanced, "5.7.1");

    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "452 4.123.456") == 1);
    CHECK_STR(r.enhanced, "4.123.456");

    static const char *const no_enh[] = {
        "550 2.1.0 class differs", "250 2.1.0x", "250 2.1234.0 x",
        "250 2.1.1234 x", "250 2..0 x", "250 2.1. x", "250 2.1 x",
        "354 3.0.0 go ahead", "250 21.0.0 x", "250 .2.1.0", "250  2.1.0 x",
        "250 2-1-0 x",
    };
    size_t k;
    for (k = 0; k < sizeof no_enh / sizeof no_enh[0]; k++) {
        smtp_reply_init(&r);
        CHECK(smtp_reply_feed(&r, no_enh[k]) == 1);
        CHECK_STR(r.enhanced, "");
    }

    /* an EHLO reply */
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "250-mx.example Hello") == 0);
    CHECK(!smtp_ehlo_has(&r, "PIPELINING", NULL, 0)); /* incomplete */
    CHECK(smtp_reply_feed(&r, "250-PIPELINING") == 0);
    CHECK(smtp_reply_feed(&r, "250-SIZE 10240000") == 0);
    CHECK(smtp_reply_feed(&r, "250-AUTH PLAIN  LOGIN") == 0);
    CHECK(smtp_reply_feed(&r, "250-") == 0);
    CHECK(smtp_reply_feed(&r, "250-auth=LOGIN") == 0);
    CHECK(smtp_reply_feed(&r, "250-SMTPUTF8") == 0);
    CHECK(smtp_reply_feed(&r, "250 8BITMIME") == 1);
    CHECK(r.nlines == 8 && r.done);
    CHECK_STR(r.text, "mx.example Hello\nPIPELINING\nSIZE 10240000\n"
                      "AUTH PLAIN  LOGIN\n\nauth=LOGIN\nSMTPUTF8\n8BITMIME");
    CHECK(smtp_ehlo_has(&r, "PIPELINING", params, sizeof params));
    CHECK_STR(params, "");
    CHECK(smtp_ehlo_has(&r, "size", params, sizeof params));
    CHECK_STR(params, "10240000");
    CHECK(smtp_ehlo_has(&r, "Auth", params, sizeof params));
    CHECK_STR(params, "PLAIN  LOGIN");
    CHECK(smtp_ehlo_has(&r, "8BITMIME", params, sizeof params));
    CHECK_STR(params, "");
    CHECK(smtp_ehlo_has(&r, "SMTPUTF8", NULL, 0));
    CHECK(smtp_ehlo_has(&r, "SIZE", params, 4));
    CHECK_STR(params, "102");
    CHECK(smtp_ehlo_has(&r, "SIZE", params, 1));
    CHECK_STR(params, "");
    strcpy(params, "junk");
    CHECK(!smtp_ehlo_has(&r, "mx.example", params, sizeof params));
    CHECK_STR(params, "");
    CHECK(!smtp_ehlo_has(&r, "PIPE", NULL, 0));
    CHECK(!smtp_ehlo_has(&r, "PIPELININGX", NULL, 0));
    CHECK(!smtp_ehlo_has(&r, "STARTTLS", NULL, 0));
    CHECK(!smtp_ehlo_has(&r, "", NULL, 0));
    CHECK(!smtp_ehlo_has(&r, NULL, NULL, 0));
    CHECK(!smtp_ehlo_has(NULL, "SIZE", NULL, 0));
    CHECK(!smtp_ehlo_has(&r, "Hello", NULL, 0));

    /* a one-line EHLO reply has no keywords */
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "250 mx.example") == 1);
    CHECK(!smtp_ehlo_has(&r, "mx.example", NULL, 0));

    /* code mismatch leaves the reply as it was */
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "250-a") == 0);
    CHECK(smtp_reply_feed(&r, "251 b") == -1);
    CHECK(smtp_reply_feed(&r, "550 b") == -1);
    CHECK(r.nlines == 1 && !r.done && r.code == 250);
    CHECK_STR(r.text, "a");
    CHECK(smtp_reply_feed(&r, "250 b") == 1);
    CHECK_STR(r.text, "a\nb");

    /* malformed lines */
    static const char *const bad[] = {
        "", "2", "25", "25 x", "250x", "2500 x", "250\tx", "abc def",
        "650 x", "150 x", "050 x", "2a0 x", " 250 x", "-250 x", "250_x",
        "\xc3\xa9\xc3\xa9 x",
    };
    for (k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        smtp_reply_init(&r);
        CHECK(smtp_reply_feed(&r, bad[k]) == -1);
        CHECK(r.code == 0 && r.nlines == 0);
    }
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, NULL) == -1);

    /* bare code lines */
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "250") == 1);
    CHECK(r.code == 250);
    CHECK_STR(r.text, "");
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "220-") == 0);
    CHECK(smtp_reply_feed(&r, "220") == 1);
    CHECK_STR(r.text, "\n");
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "221 ") == 1);
    CHECK_STR(r.text, "");
    CHECK(smtp_reply_feed(&r, "221 ") == -1);

    /* control characters are neutralised */
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "250 a\x1b[31mb\rc\x7f") == 1);
    CHECK_STR(r.text, "a?[31mb?c?");
    smtp_reply_init(&r);
    CHECK(smtp_reply_feed(&r, "250-a\nfake") == 0);
    CHECK(smtp_reply_feed(&r, "250 x") == 1);
    CHECK(!smtp_ehlo_has(&r, "fake", NULL, 0));

    /* truncation: many long lines never overflow text */
    smtp_reply_init(&r);
    memset(big, 'x', sizeof big);
    memcpy(big, "250-", 4);
    big[4 + 500] = '\0';
    for (i = 0; i < 10; i++)
        CHECK(smtp_reply_feed(&r, big) == 0);
    CHECK(smtp_reply_feed(&r, "250 end") == 1);
    CHECK(r.nlines == 11);
    CHECK(strlen(r.text) == sizeof r.text - 1);

    /* truncation never splits a UTF-8 sequence */
    smtp_reply_init(&r);
    memset(big, 'a', sizeof big);
    memcpy(big, "250 ", 4);
    memcpy(big + 4 + 2046, "\xc3\xa9", 2);
    big[4 + 2048] = '\0';
    CHECK(smtp_reply_feed(&r, big) == 1);
    CHECK(strlen(r.text) == 2046);
    CHECK(r.text[2045] == 'a');

    /* bounded number of lines */
    smtp_reply_init(&r);
    zeros = 0;
    for (i = 0; i < 1000; i++) {
        int rc = smtp_reply_feed(&r, "250-line");
        if (rc == 0)
            zeros++;
        if (rc != 0)
            break;
    }
    CHECK(i < 1000);
    CHECK(zeros == 200);
    CHECK(smtp_reply_feed(&r, "250 last") == -1);
}

/* ---- fuzz ---- */

static uint32_t rng_state = 0x9E3779B9u;

static uint32_t rng(void)
{
    uint32_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return rng_state = x;
}

static void random_line(char *buf, size_t cap)
{
    static const char *const prefixes[] = {
        "", "<", "<a@b.c> ", "<> ", "MAIL FROM:", "RCPT TO:<x@y> ",
        "250-", "250 ", "<a@b> SIZE=", "<a@b> NOTIFY=", "<a@b> ORCPT=rfc822;",
        "<a@b> ENVID=",
    };
    static const char alphabet[] = "<>@.:,;[]\"\\ =+-aZ09SIZEBODYNOTIFY"
                                   "NEVER,SUCCESS\x01\x7f\xc3\xa9\xed\xa0";
    const char *pre = prefixes[rng() % (sizeof prefixes / sizeof prefixes[0])];
    size_t n = strlen(pre), len = n + rng() % (cap - 1 - n), i;

    memcpy(buf, pre, n);
    for (i = n; i < len; i++) {
        char c = (rng() & 3) == 0 ? (char)(rng() & 0xff)
                                  : alphabet[rng() % (sizeof alphabet - 1)];
        buf[i] = c != '\0' ? c : 'q';
    }
    buf[len] = '\0';
}

static bool err_sane(const struct smtp_err *e)
{
    return (e->code == 501 || e->code == 553 || e->code == 555) &&
           strlen(e->reply) < sizeof e->reply && e->reply[0] == '5' &&
           e->reply[3] == ' ';
}

static void test_fuzz(void)
{
    char line[2100], out[400];
    struct smtp_reply r;
    int iter, bad = 0, oks = 0, fed = 0;

    smtp_reply_init(&r);
    for (iter = 0; iter < 20000; iter++) {
        struct smtp_cmd c;
        bool u = rng() & 1;

        random_line(line, (rng() & 3) ? 80 : sizeof line);
        smtp_cmd_parse(line, &c);
        if (c.arg != NULL && (c.arg < line || c.arg > line + strlen(line)) &&
            c.arg[0] != '\0')
            bad++;
        if (smtp_parse_mail(line, &ma, u, &err))
            oks += err.code == 0 ? 1 : (bad++, 0);
        else if (!err_sane(&err))
            bad++;
        if (smtp_parse_rcpt(line, &ra, u, &err))
            oks += err.code == 0 ? 1 : (bad++, 0);
        else if (!err_sane(&err))
            bad++;
        if (xtext_valid(line) &&
            !xtext_decode(line, out, sizeof out) && strlen(line) < 100 &&
            strstr(line, "+00") == NULL)
            bad++;
        if (xtext_encode(line, out, sizeof out)) {
            char back[400];
            if (!xtext_valid(out) || !xtext_decode(out, back, sizeof back) ||
                strcmp(back, line) != 0)
                bad++;
        }
        if (strlen(r.text) >= sizeof r.text)
            bad++;
        if (smtp_reply_feed(&r, line) != 0) {
            fed++;
            (void)smtp_ehlo_has(&r, "SIZE", out, sizeof out);
            smtp_reply_init(&r);
        }
    }
    CHECK(bad == 0);
    CHECK(oks > 50);
    CHECK(fed > 100);
}

int main(void)
{
    test_commands();
    test_mail_address();
    test_mail_params();
    test_rcpt();
    test_xtext();
    test_replies();
    test_fuzz();
    CHECK_DONE();
}
