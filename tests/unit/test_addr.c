/* test_addr.c - unit tests for common/addr.c (RFC 5321 / RFC 6531 paths). */
#include <stdint.h>
#include <stdlib.h>

#include "../../common/addr.h"
#include "check.h"

#define U8 ADDR_ALLOW_UTF8
#define NUL_OK ADDR_ALLOW_NULL
#define BARE ADDR_ALLOW_BARE

static struct mailbox mb;

static enum addr_result parse(const char *s, int flags)
{
    const char *end;
    return addr_parse_path(s, &end, &mb, flags);
}

/* Parses s, expects success, the given parts and nothing left over. */
static void expect_ok(const char *s, int flags, const char *local,
                      const char *domain)
{
    const char *end = NULL;
    enum addr_result r = addr_parse_path(s, &end, &mb, flags);

    CHECK(r == ADDR_OK);
    if (r != ADDR_OK) {
        printf("  input: %s\n", s);
        return;
    }
    CHECK_STR(mb.local, local);
    CHECK_STR(mb.domain, domain);
    CHECK(end != NULL && *end == '\0');
    CHECK(!mb.null);
}

/* Builds a string of n copies of c into buf (which must be large). */
static char *rep(char *buf, char c, size_t n)
{
    memset(buf, c, n);
    buf[n] = '\0';
    return buf;
}

/* A domain of exactly n octets made of 62-octet labels and a short tail
 * (at most 63 when the final dot position is turned into a letter). */
static char *long_domain(char *buf, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        buf[i] = (i % 63 == 62) ? '.' : 'a';
    if (buf[n - 1] == '.')
        buf[n - 1] = 'b';
    buf[n] = '\0';
    return buf;
}

static void test_basic(void)
{
    const char *end;

    expect_ok("<user@example.com>", 0, "user", "example.com");
    expect_ok("<User.Name+tag@Sub.Example.COM>", 0, "User.Name+tag",
              "Sub.Example.COM");
    expect_ok("<a!#$%&'*+-/=?^_`{|}~@x.org>", 0, "a!#$%&'*+-/=?^_`{|}~",
              "x.org");
    expect_ok("<a@b>", 0, "a", "b");
    expect_ok("<1@123.com>", 0, "1", "123.com");
    expect_ok("<a@a-b.c-d>", 0, "a", "a-b.c-d");
    expect_ok("<a@1.2.3.4>", 0, "a", "1.2.3.4"); /* a domain, not a literal */
    CHECK(!mb.literal);

    /* null path */
    CHECK(addr_parse_path("<>", &end, &mb, NUL_OK) == ADDR_OK);
    CHECK(mb.null);
    CHECK(*end == '\0');
    CHECK_STR(mb.local, "");
    CHECK(parse("<>", 0) == ADDR_SYNTAX);
    CHECK(parse("<>", U8 | BARE) == ADDR_SYNTAX);
    CHECK(parse("< >", NUL_OK) == ADDR_SYNTAX);
    CHECK(parse("<<>>", NUL_OK) == ADDR_SYNTAX);

    /* *end points after '>'; what follows is the caller's business */
    CHECK(addr_parse_path("<a@b> SIZE=10", &end, &mb, 0) == ADDR_OK);
    CHECK_STR(end, " SIZE=10");
    CHECK(addr_parse_path("<a@b>garbage", &end, &mb, 0) == ADDR_OK);
    CHECK_STR(end, "garbage");
    CHECK(addr_parse_path("<>x", &end, &mb, NUL_OK) == ADDR_OK);
    CHECK_STR(end, "x");

    /* on failure *end is the start and the mailbox is cleared */
    {
        const char *in = "<a@b";
        CHECK(addr_parse_path("<x@y>", &end, &mb, 0) == ADDR_OK);
        CHECK(addr_parse_path(in, &end, &mb, 0) == ADDR_SYNTAX);
        CHECK(end == in);
        CHECK_STR(mb.local, "");
        CHECK_STR(mb.domain, "");
    }
    CHECK(addr_parse_path(NULL, &end, &mb, 0) == ADDR_SYNTAX);
    CHECK(addr_parse_path("<a@b>", NULL, &mb, 0) == ADDR_OK);
    CHECK(addr_parse_path("<a@b>", &end, NULL, 0) == ADDR_SYNTAX);
}

static void test_bare(void)
{
    const char *end;

    CHECK(parse("user@example.com", 0) == ADDR_SYNTAX);
    expect_ok("user@example.com", BARE, "user", "example.com");
    expect_ok("<user@example.com>", BARE, "user", "example.com");
    CHECK(addr_parse_path("u@d SIZE=1", &end, &mb, BARE) == ADDR_OK);
    CHECK_STR(end, " SIZE=1");
    CHECK_STR(mb.domain, "d");
    CHECK(addr_parse_path("u@[1.2.3.4] x", &end, &mb, BARE) == ADDR_OK);
    CHECK_STR(end, " x");
    CHECK(mb.literal);
    CHECK(parse("u@[1.2.3.4]x", BARE) == ADDR_SYNTAX);
    CHECK(parse("u@d>", BARE) == ADDR_SYNTAX);
    CHECK(parse("@a:u@d", BARE) == ADDR_SYNTAX);
    CHECK(parse("", BARE | NUL_OK) == ADDR_SYNTAX);
    CHECK(parse("u", BARE) == ADDR_SYNTAX);
    CHECK(parse("u@", BARE) == ADDR_SYNTAX);
    expect_ok("\"a b\"@d", BARE, "\"a b\"", "d");
}

static void test_local_part(void)
{
    char buf[4096], in[4200];

    /* quoted strings are kept as written, quotes included */
    expect_ok("<\"john doe\"@example.com>", 0, "\"john doe\"", "example.com");
    expect_ok("<\"a\\\"b\"@x.org>", 0, "\"a\\\"b\"", "x.org");
    expect_ok("<\"a\\\\\"@x.org>", 0, "\"a\\\\\"", "x.org");
    expect_ok("<\"\"@x.org>", 0, "\"\"", "x.org");
    expect_ok("<\"a@b\"@x.org>", 0, "\"a@b\"", "x.org");
    expect_ok("<\"a>b\"@x.org>", 0, "\"a>b\"", "x.org");
    expect_ok("<\"<>,:;\"@x.org>", 0, "\"<>,:;\"", "x.org");
    expect_ok("<\"\\ \"@x.org>", 0, "\"\\ \"", "x.org");

    /* dots */
    CHECK(parse("<.a@b>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a.@b>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a..b@b>", 0) == ADDR_SYNTAX);
    CHECK(parse("<.@b>", 0) == ADDR_SYNTAX);
    expect_ok("<a.b.c@d>", 0, "a.b.c", "d");

    /* empty / missing parts */
    CHECK(parse("<@b>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a@>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a@b@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<", 0) == ADDR_SYNTAX);
    CHECK(parse("", 0) == ADDR_SYNTAX);
    CHECK(parse(">", 0) == ADDR_SYNTAX);

    /* specials and spaces outside quotes */
    CHECK(parse("<a b@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("< a@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a@c >", 0) == ADDR_SYNTAX);
    CHECK(parse("<a(b)@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a,b@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a\\b@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a[b]@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a\"b\"@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"a\"b@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"a\".b@c>", 0) == ADDR_SYNTAX);

    /* control characters, in and out of quotes, and DEL */
    CHECK(parse("<a\x01" "b@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a\tb@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a\rb@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a\nb@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a\x7f" "b@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"a\x01\"@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"a\t\"@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"a\x7f\"@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"a\\\x01\"@c>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"a\\\x7f\"@c>", 0) == ADDR_SYNTAX);

    /* unbalanced quotes, backslash at the end */
    CHECK(parse("<\"abc@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"abc", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"abc\\", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"abc\\\"@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("\"", BARE) == ADDR_SYNTAX);
    CHECK(parse("\"\\", BARE) == ADDR_SYNTAX);
    CHECK(parse("<\"", 0) == ADDR_SYNTAX);
    CHECK(parse("<\"\"\"@d>", 0) == ADDR_SYNTAX);

    /* missing '>' and doubled brackets */
    CHECK(parse("<a@b", 0) == ADDR_SYNTAX);
    CHECK(parse("<a@b.c", 0) == ADDR_SYNTAX);
    CHECK(parse("<<a@b>>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a@b>>", 0) == ADDR_OK); /* the extra '>' is trailing */

    /* local part length: 256 stored, 257 too long, 4000 too long */
    snprintf(in, sizeof in, "<%s@d>", rep(buf, 'x', ADDR_LOCAL_MAX));
    CHECK(parse(in, 0) == ADDR_OK);
    CHECK(strlen(mb.local) == ADDR_LOCAL_MAX);
    snprintf(in, sizeof in, "<%s@d>", rep(buf, 'x', ADDR_LOCAL_MAX + 1));
    CHECK(parse(in, 0) == ADDR_TOOLONG);
    CHECK_STR(mb.local, "");
    snprintf(in, sizeof in, "<%s@d>", rep(buf, 'x', 4000));
    CHECK(parse(in, 0) == ADDR_TOOLONG);
    /* quoted: the quotes count, as they are stored */
    snprintf(in, sizeof in, "<\"%s\"@d>", rep(buf, 'x', ADDR_LOCAL_MAX - 2));
    CHECK(parse(in, 0) == ADDR_OK);
    snprintf(in, sizeof in, "<\"%s\"@d>", rep(buf, 'x', ADDR_LOCAL_MAX - 1));
    CHECK(parse(in, 0) == ADDR_TOOLONG);
    /* syntax errors win over length */
    snprintf(in, sizeof in, "<%s.@d>", rep(buf, 'x', 1000));
    CHECK(parse(in, 0) == ADDR_SYNTAX);
}

static void test_domain(void)
{
    char buf[4096], in[4200];

    /* label 63 ok, 64 not */
    snprintf(in, sizeof in, "%s.com", rep(buf, 'a', 63));
    CHECK(addr_valid_domain(in, false));
    snprintf(in, sizeof in, "%s.com", rep(buf, 'a', 64));
    CHECK(!addr_valid_domain(in, false));
    CHECK(!addr_valid_domain(rep(buf, 'a', 64), false));
    CHECK(addr_valid_domain(rep(buf, 'a', 63), false));
    snprintf(in, sizeof in, "<u@x.%s>", rep(buf, 'a', 64));
    CHECK(parse(in, 0) == ADDR_SYNTAX);
    snprintf(in, sizeof in, "<u@x.%s>", rep(buf, 'a', 63));
    CHECK(parse(in, 0) == ADDR_OK);

    /* total 255 ok, 256 not */
    long_domain(buf, 255);
    CHECK(strlen(buf) == 255);
    CHECK(addr_valid_domain(buf, false));
    snprintf(in, sizeof in, "<u@%s>", buf);
    CHECK(parse(in, 0) == ADDR_OK);
    CHECK(strlen(mb.domain) == 255);
    long_domain(buf, 256);
    CHECK(!addr_valid_domain(buf, false));
    snprintf(in, sizeof in, "<u@%s>", buf);
    CHECK(parse(in, 0) == ADDR_TOOLONG);
    long_domain(buf, 3000);
    CHECK(!addr_valid_domain(buf, true));
    snprintf(in, sizeof in, "<u@%s>", buf);
    CHECK(parse(in, 0) == ADDR_TOOLONG);

    /* dots and hyphens */
    CHECK(addr_valid_domain("example.com", false));
    CHECK(addr_valid_domain("EXAMPLE.com", false));
    CHECK(addr_valid_domain("a", false));
    CHECK(addr_valid_domain("a-b--c.d", false));
    CHECK(addr_valid_domain("xn--mnchen-3ya.de", false));
    CHECK(addr_valid_domain("1.2.3.4", false));
    CHECK(!addr_valid_domain(".example.com", false));
    CHECK(!addr_valid_domain("example.com.", false));
    CHECK(!addr_valid_domain("example..com", false));
    CHECK(!addr_valid_domain(".", false));
    CHECK(!addr_valid_domain("", false));
    CHECK(!addr_valid_domain(NULL, false));
    CHECK(!addr_valid_domain("-a.com", false));
    CHECK(!addr_valid_domain("a-.com", false));
    CHECK(!addr_valid_domain("a.-com", false));
    CHECK(!addr_valid_domain("a.com-", false));
    CHECK(!addr_valid_domain("-", false));
    CHECK(!addr_valid_domain("a_b.com", false));
    CHECK(!addr_valid_domain("a b.com", false));
    CHECK(!addr_valid_domain("a\tb.com", false));
    CHECK(!addr_valid_domain("a\x01.com", false));
    CHECK(!addr_valid_domain("[1.2.3.4]", false));
    CHECK(!addr_valid_domain("a,b", false));
    CHECK(parse("<u@.example.com>", 0) == ADDR_SYNTAX);
    /* one trailing root dot is the same domain, dropped (as Postfix) */
    expect_ok("<u@Example.COM.>", 0, "u", "Example.COM");
    expect_ok("u@example.com.", BARE, "u", "example.com");
    CHECK(parse("<u@example.com..>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@.>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@example..com>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@-example.com>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@example-.com>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@exa_mple.com>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@exa mple.com>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@example.com\x01>", 0) == ADDR_SYNTAX);
}

static void test_route(void)
{
    const char *end;

    expect_ok("<@a,@b:u@d>", 0, "u", "d");
    expect_ok("<@a:u@d>", 0, "u", "d");
    expect_ok("<@a.example,@b.example,@c.example:\"q r\"@d>", 0, "\"q r\"",
              "d");
    expect_ok("<@a,@b:u@[1.2.3.4]>", 0, "u", "[1.2.3.4]");
    CHECK(addr_parse_path("<@a,@b:u@d> NOTIFY=NEVER", &end, &mb, 0) ==
          ADDR_OK);
    CHECK_STR(end, " NOTIFY=NEVER");
    CHECK(parse("<@a,u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a,:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a,,@b:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a,@b,:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a:>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a:@b:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@-a:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@[1.2.3.4]:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<a,@b:u@d>", 0) == ADDR_SYNTAX);
    CHECK(parse("<@a:>", NUL_OK) == ADDR_SYNTAX);
    /* a UTF-8 route needs SMTPUTF8 even though it is discarded */
    CHECK(parse("<@b\xc3\xbc:u@d>", 0) == ADDR_NEEDUTF8);
    expect_ok("<@b\xc3\xbc:u@d>", U8, "u", "d");
}

static void test_literals(void)
{
    expect_ok("<u@[192.0.2.1]>", 0, "u", "[192.0.2.1]");
    CHECK(mb.literal);
    expect_ok("<u@[IPv6:2001:db8::1]>", 0, "u", "[IPv6:2001:db8::1]");
    CHECK(mb.literal);
    expect_ok("<u@[x-tag:some,thing]>", 0, "u", "[x-tag:some,thing]");
    expect_ok("<u@[tag:a>b]>", 0, "u", "[tag:a>b]");

    /* IPv4 */
    CHECK(addr_valid_literal("[0.0.0.0]"));
    CHECK(addr_valid_literal("[255.255.255.255]"));
    CHECK(addr_valid_literal("[001.02.3.4]"));
    CHECK(!addr_valid_literal("[256.1.1.1]"));
    CHECK(!addr_valid_literal("[1.2.3.999]"));
    CHECK(!addr_valid_literal("[0001.2.3.4]"));
    CHECK(!addr_valid_literal("[1.2.3]"));
    CHECK(!addr_valid_literal("[1.2.3.4.5]"));
    CHECK(!addr_valid_literal("[1.2.3.]"));
    CHECK(!addr_valid_literal("[.1.2.3]"));
    CHECK(!addr_valid_literal("[1..2.3]"));
    CHECK(!addr_valid_literal("[1.2.3.4 ]"));
    CHECK(!addr_valid_literal("[ 1.2.3.4]"));
    CHECK(!addr_valid_literal("[-1.2.3.4]"));
    CHECK(!addr_valid_literal("[]"));
    CHECK(!addr_valid_literal("["));
    CHECK(!addr_valid_literal("]"));
    CHECK(!addr_valid_literal(""));
    CHECK(!addr_valid_literal(NULL));
    CHECK(!addr_valid_literal("1.2.3.4"));
    CHECK(!addr_valid_literal("[1.2.3.4"));
    CHECK(!addr_valid_literal("[[1.2.3.4]]"));
    CHECK(!addr_valid_literal("[1.2.3.4]]"));

    /* IPv6 forms */
    CHECK(addr_valid_literal("[IPv6:1:2:3:4:5:6:7:8]"));
    CHECK(addr_valid_literal("[IPv6:ffff:FFFF:0:00:000:0000:a:B]"));
    CHECK(addr_valid_literal("[ipv6:::1]"));
    CHECK(addr_valid_literal("[IPV6:::1]"));
    CHECK(addr_valid_literal("[IPv6:::]"));
    CHECK(addr_valid_literal("[IPv6:1::]"));
    CHECK(addr_valid_literal("[IPv6:1:2:3::8]"));
    CHECK(addr_valid_literal("[IPv6:1:2:3:4:5:6::8]"));
    CHECK(addr_valid_literal("[IPv6:1::3:4:5:6:7:8]"));
    CHECK(addr_valid_literal("[IPv6:fe80::1]"));
    CHECK(addr_valid_literal("[IPv6:::ffff:192.0.2.1]"));
    CHECK(addr_valid_literal("[IPv6:::192.0.2.1]"));
    CHECK(addr_valid_literal("[IPv6:1:2:3:4:5:6:192.0.2.1]"));
    CHECK(addr_valid_literal("[IPv6:1::6:192.0.2.1]"));
    CHECK(!addr_valid_literal("[IPv6:1:2:3:4:5:6:7]"));
    CHECK(!addr_valid_literal("[IPv6:1:2:3:4:5:6:7:8:9]"));
    CHECK(!addr_valid_literal("[IPv6:1::3:4:5:6:7:8:9]"));
    CHECK(!addr_valid_literal("[IPv6:1::2::3]"));
    CHECK(!addr_valid_literal("[IPv6::::]"));
    CHECK(!addr_valid_literal("[IPv6:1:::2]"));
    CHECK(!addr_valid_literal("[IPv6:12345::]"));
    CHECK(!addr_valid_literal("[IPv6:g::1]"));
    CHECK(!addr_valid_literal("[IPv6::1]"));
    CHECK(!addr_valid_literal("[IPv6:1:]"));
    CHECK(!addr_valid_literal("[IPv6:1:2:3:4:5:6:7:8:]"));
    CHECK(!addr_valid_literal("[IPv6:]"));
    CHECK(!addr_valid_literal("[IPv6:1.2.3.4]"));
    CHECK(!addr_valid_literal("[IPv6:::1.2.3]"));
    CHECK(!addr_valid_literal("[IPv6:::256.1.1.1]"));
    CHECK(!addr_valid_literal("[IPv6:1.2.3.4::]"));
    CHECK(!addr_valid_literal("[IPv6:::1.2.3.4:5]"));
    CHECK(!addr_valid_literal("[IPv6:1:2:3:4:5:6:7:192.0.2.1]"));
    CHECK(!addr_valid_literal("[IPv6:1:2:3:4:5:192.0.2.1]"));
    CHECK(!addr_valid_literal("[IPv6: ::1]"));
    CHECK(!addr_valid_literal("[IPv6:::1 ]"));
    CHECK(!addr_valid_literal("[IPv6:%::1]"));
    CHECK(!addr_valid_literal("[IPv6:fe80::1%eth0]"));
    CHECK(!addr_valid_literal("[::1]")); /* needs the tag */
    /* "2001" is a syntactically valid Standardized-tag: a general literal */
    CHECK(addr_valid_literal("[2001:db8::1]"));

    /* General-address-literal */
    CHECK(addr_valid_literal("[x400:abc]"));
    CHECK(addr_valid_literal("[a-b:c]"));
    CHECK(!addr_valid_literal("[tag:]"));
    CHECK(!addr_valid_literal("[:abc]"));
    CHECK(!addr_valid_literal("[-:abc]"));
    CHECK(!addr_valid_literal("[tag-:abc]"));
    CHECK(!addr_valid_literal("[ta g:abc]"));
    CHECK(!addr_valid_literal("[tag:a b]"));
    CHECK(!addr_valid_literal("[tag:a\\b]"));
    CHECK(!addr_valid_literal("[tag:a[b]"));
    CHECK(!addr_valid_literal("[tag:a\x01]"));
    CHECK(!addr_valid_literal("[tag:a\xc3\xbc]"));
    CHECK(!addr_valid_literal("[abc]"));

    /* in paths */
    CHECK(parse("<u@[1.2.3.4]x>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@x[1.2.3.4]>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@[1.2.3.4>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@[1.2.3.4]", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@[256.2.3.4]>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@[]>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@[IPv6:1::2::3]>", 0) == ADDR_SYNTAX);
    CHECK(parse("<u@[tag:\xc3\xbc]>", U8) == ADDR_SYNTAX);

    /* a literal longer than the domain field */
    {
        char buf[600], in[700];
        memset(buf, 'x', 400);
        buf[400] = '\0';
        snprintf(in, sizeof in, "<u@[tag:%s]>", buf);
        CHECK(parse(in, 0) == ADDR_TOOLONG);
        snprintf(in, sizeof in, "[tag:%s]", buf);
        CHECK(!addr_valid_literal(in));
    }
}

static void test_utf8(void)
{
    /* valid UTF-8 needs the flag */
    CHECK(parse("<j\xc3\xb6hn@example.com>", 0) == ADDR_NEEDUTF8);
    CHECK_STR(mb.local, "");
    expect_ok("<j\xc3\xb6hn@example.com>", U8, "j\xc3\xb6hn", "example.com");
    CHECK(parse("<u@m\xc3\xbcnchen.de>", 0) == ADDR_NEEDUTF8);
    expect_ok("<u@m\xc3\xbcnchen.de>", U8, "u", "m\xc3\xbcnchen.de");
    expect_ok("<\"j\xc3\xb6 hn\"@x>", U8, "\"j\xc3\xb6 hn\"", "x");
    CHECK(parse("<\"j\xc3\xb6 hn\"@x>", 0) == ADDR_NEEDUTF8);
    /* 3- and 4-octet sequences, boundaries */
    expect_ok("<\xe2\x82\xac@x>", U8, "\xe2\x82\xac", "x");           /* U+20AC */
    expect_ok("<\xf0\x9f\x98\x80@x>", U8, "\xf0\x9f\x98\x80", "x");   /* U+1F600 */
    expect_ok("<\xc2\xa0@x>", U8, "\xc2\xa0", "x");                   /* U+00A0 */
    expect_ok("<\xed\x9f\xbf@x>", U8, "\xed\x9f\xbf", "x");           /* U+D7FF */
    expect_ok("<\xee\x80\x80@x>", U8, "\xee\x80\x80", "x");           /* U+E000 */
    expect_ok("<\xf4\x8f\xbf\xbf@x>", U8, "\xf4\x8f\xbf\xbf", "x");   /* U+10FFFF */
    expect_ok("<\xe0\xa0\x80@x>", U8, "\xe0\xa0\x80", "x");           /* U+0800 */
    expect_ok("<\xf0\x90\x80\x80@x>", U8, "\xf0\x90\x80\x80", "x");   /* U+10000 */
    /* a U-label longer than 63 octets is accepted (see label_ok) */
    {
        char in[300];
        size_t i;
        strcpy(in, "<u@");
        for (i = 0; i < 40; i++)
            strcat(in, "\xc3\xbc");
        strcat(in, ".de>");
        CHECK(parse(in, U8) == ADDR_OK);
        CHECK(parse(in, 0) == ADDR_NEEDUTF8);
    }
    CHECK(addr_valid_domain("m\xc3\xbcnchen.de", true));
    CHECK(!addr_valid_domain("m\xc3\xbcnchen.de", false));
    CHECK(!addr_valid_domain("\xc3\xbc-.de", true));

    /* malformed UTF-8 is a syntax error with or without the flag */
    static const char *const bad[] = {
        "<\x80@x>",                  /* lone continuation */
        "<a\xbf@x>",                 /* lone continuation */
        "<\xc3@x>",                  /* truncated 2-octet */
        "<\xc3",                     /* truncated at end of input */
        "<\xe2\x82@x>",              /* truncated 3-octet */
        "<\xf0\x9f\x98@x>",          /* truncated 4-octet */
        "<\xc0\xaf@x>",              /* overlong '/' */
        "<\xc1\xbf@x>",              /* overlong */
        "<\xe0\x80\xaf@x>",          /* overlong 3-octet */
        "<\xe0\x9f\xbf@x>",          /* overlong 3-octet */
        "<\xf0\x80\x80\xaf@x>",      /* overlong 4-octet */
        "<\xf0\x8f\xbf\xbf@x>",      /* overlong 4-octet */
        "<\xed\xa0\x80@x>",          /* surrogate D800 */
        "<\xed\xbf\xbf@x>",          /* surrogate DFFF */
        "<\xf4\x90\x80\x80@x>",      /* > U+10FFFF */
        "<\xf5\x80\x80\x80@x>",      /* invalid lead */
        "<\xf8\x88\x80\x80\x80@x>",  /* 5-octet form */
        "<\xfe@x>",                  /* invalid */
        "<\xff@x>",                  /* invalid */
        "<\xc2\x80@x>",              /* U+0080, a C1 control */
        "<\xc2\x9f@x>",              /* U+009F, a C1 control */
        "<\xc3\x28@x>",              /* bad continuation */
        "<\xe2\x28\xa1@x>",          /* bad continuation */
        "<\xe2\x82\x28@x>",          /* bad continuation */
        "<u@\x80x>",                 /* in the domain */
        "<u@m\xc3nchen.de>",
        "<u@\xed\xa0\x80.de>",
        "<\"\xc3\"@x>",              /* in a quoted string */
        "<\"a\\\xc3\xbc\"@x>",       /* quoted-pair is ASCII only */
        "<@\xc3:u@x>",               /* in a source route */
    };
    size_t i;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        enum addr_result r1 = parse(bad[i], U8), r0 = parse(bad[i], 0);
        CHECK(r1 == ADDR_SYNTAX && r0 == ADDR_SYNTAX);
        if (r1 != ADDR_SYNTAX || r0 != ADDR_SYNTAX)
            printf("  bad UTF-8 case %zu accepted\n", i);
    }
    CHECK(!addr_valid_domain("\xc0\xaf.de", true));
    CHECK(!addr_valid_domain("\xed\xa0\x80.de", true));
    CHECK(!addr_valid_domain("a\xc3", true));

    /* order: syntax, then length, then SMTPUTF8 */
    CHECK(parse("<j\xc3\xb6..x@d>", 0) == ADDR_SYNTAX);
    {
        char in[700];
        size_t i2;
        strcpy(in, "<");
        for (i2 = 0; i2 < 200; i2++)
            strcat(in, "\xc3\xb6");
        strcat(in, "@x>");
        CHECK(parse(in, 0) == ADDR_TOOLONG);
        CHECK(parse(in, U8) == ADDR_TOOLONG);
    }
}

static void test_helpers(void)
{
    char buf[600];
    struct mailbox m;

    CHECK(parse("<\"a b\"@Example.COM>", 0) == ADDR_OK);
    CHECK(addr_format(&mb, buf, sizeof buf));
    CHECK_STR(buf, "\"a b\"@Example.COM");
    CHECK(addr_format(&mb, buf, strlen("\"a b\"@Example.COM") + 1));
    CHECK(!addr_format(&mb, buf, strlen("\"a b\"@Example.COM")));
    CHECK_STR(buf, "");
    CHECK(!addr_format(&mb, buf, 0));
    CHECK(!addr_format(NULL, buf, sizeof buf));
    CHECK(!addr_format(&mb, NULL, 10));
    CHECK(parse("<>", NUL_OK) == ADDR_OK);
    strcpy(buf, "junk");
    CHECK(addr_format(&mb, buf, sizeof buf));
    CHECK_STR(buf, "");
    memset(&m, 0, sizeof m);
    CHECK(!addr_format(&m, buf, sizeof buf)); /* neither null nor parsed */
    /* longest possible address fits ADDR_MAX + 1 */
    {
        char in[700], lp[300], dom[300];
        rep(lp, 'l', ADDR_LOCAL_MAX);
        long_domain(dom, ADDR_DOMAIN_MAX);
        snprintf(in, sizeof in, "<%s@%s>", lp, dom);
        CHECK(parse(in, 0) == ADDR_OK);
        CHECK(addr_format(&mb, buf, ADDR_MAX + 1));
        CHECK(strlen(buf) == ADDR_MAX);
        CHECK(!addr_format(&mb, buf, ADDR_MAX));
    }

    addr_domain_key("Example.COM", buf, sizeof buf);
    CHECK_STR(buf, "example.com");
    addr_domain_key("[IPv6:FE80::1]", buf, sizeof buf);
    CHECK_STR(buf, "[ipv6:fe80::1]");
    addr_domain_key("M\xc3\x9cNCHEN.de", buf, sizeof buf);
    CHECK_STR(buf, "m\xc3\x9cnchen.de"); /* only ASCII is folded */
    addr_domain_key("ABCDEF", buf, 4);
    CHECK_STR(buf, "abc");
    addr_domain_key("ABC", buf, 1);
    CHECK_STR(buf, "");
    addr_domain_key(NULL, buf, sizeof buf);
    CHECK_STR(buf, "");
    buf[0] = 'z';
    addr_domain_key("A", buf, 0);
    CHECK(buf[0] == 'z');

    CHECK_STR(addr_domain_of("a@b.c"), "b.c");
    CHECK_STR(addr_domain_of("\"x@y\"@z.org"), "z.org");
    CHECK_STR(addr_domain_of("\"x\\\"@y\"@z.org"), "z.org");
    /* a General-address-literal may hold '@' too (dcontent) */
    CHECK_STR(addr_domain_of("u@[tag:a@victim.example]"), "[tag:a@victim.example]");
    CHECK_STR(addr_domain_of("\"a@b\"@[tag:c@d]"), "[tag:c@d]");
    CHECK(addr_domain_of("\"unterminated@x") == NULL);
    CHECK(addr_domain_of("nodomain") == NULL);
    CHECK(addr_domain_of("a@") == NULL);
    CHECK(addr_domain_of("") == NULL);
    CHECK(addr_domain_of(NULL) == NULL);
}

/* xorshift32 with a fixed seed: reproducible. */
static uint32_t rng_state = 0x2545F491u;

static uint32_t rng(void)
{
    uint32_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return rng_state = x;
}

/* Random input biased towards the characters the grammar cares about. */
static void random_input(char *buf, size_t cap)
{
    static const char alphabet[] = "<>@.:,[]\"\\ -aZ09+=_xIPv6\x01\x7f"
                                   "\xc3\xbc\xed\xa0\x80\xf0\x9f\xff";
    size_t n = rng() % (cap - 1), i;

    for (i = 0; i < n; i++) {
        char c = (rng() & 3) == 0 ? (char)(rng() & 0xff)
                                  : alphabet[rng() % (sizeof alphabet - 1)];
        buf[i] = c != '\0' ? c : 'q';
    }
    buf[n] = '\0';
    /* often start like a path so the parser gets past the first byte */
    if (n > 2 && (rng() & 1))
        buf[0] = '<';
}

static void plain_is(const char *local, const char *want)
{
    char out[ADDR_LOCAL_MAX + 1];
    CHECK(addr_local_plain(local, out, sizeof out));
    CHECK_STR(out, want);
}

/* Quoting that adds nothing names the same mailbox (a maildir's %u). */
static void test_local_plain(void)
{
    plain_is("\"bob\"", "bob");
    plain_is("\"bob.smith\"", "bob.smith");
    /* quoting that is needed stays, and what odmrd's recipient lists
     * would not unquote either (a quoted-pair, UTF-8) */
    plain_is("\"b\\ob\"", "\"b\\ob\"");
    plain_is("\"j\xc3\xbcrgen\"", "\"j\xc3\xbcrgen\"");
    plain_is("\"a b\"", "\"a b\"");
    plain_is("\"a..b\"", "\"a..b\"");
    plain_is("\".bob\"", "\".bob\"");
    plain_is("\"bob.\"", "\"bob.\"");
    plain_is("\"a\\\"b\"", "\"a\\\"b\"");
    plain_is("\"\"", "\"\"");
    plain_is("plain", "plain");
    char small[3];
    CHECK(!addr_local_plain("\"bob\"", small, sizeof small));
}

static void test_fuzz(void)
{
    static const char pieces[] = "a.b\"c d\"\\@[x]:,\xc3\xbc";
    char in[700], out[ADDR_MAX + 3], again[ADDR_MAX + 3];
    int iter, okcount = 0, bad = 0;

    for (iter = 0; iter < 20000; iter++) {
        int flags = (int)(rng() & 7);
        const char *end;
        enum addr_result r;

        random_input(in, (rng() & 1) ? 40 : sizeof in);
        if (iter % 5 == 0) /* a random piece of local-part-ish text */
            snprintf(in, sizeof in, "<%.*s@a.b>", (int)(rng() % 20),
                     &pieces[rng() % 10]);
        r = addr_parse_path(in, &end, &mb, flags);
        (void)addr_valid_domain(in, flags & 1);
        (void)addr_valid_literal(in);
        if (r != ADDR_OK) {
            if (end != in || mb.local[0] || mb.domain[0])
                bad++;
            continue;
        }
        okcount++;
        if (end < in || end > in + strlen(in) ||
            strlen(mb.local) > ADDR_LOCAL_MAX ||
            strlen(mb.domain) > ADDR_DOMAIN_MAX)
            bad++;
        /* round trip: the formatted address parses to the same mailbox */
        if (!addr_format(&mb, out + 1, sizeof out - 2)) {
            bad++;
            continue;
        }
        if (mb.null)
            continue;
        out[0] = '<';
        strcat(out, ">");
        strcpy(again, mb.local);
        if (addr_parse_path(out, &end, &mb, flags) != ADDR_OK ||
            strcmp(again, mb.local) != 0)
            bad++;
    }
    CHECK(bad == 0);
    CHECK(okcount > 100); /* the fuzzer reaches the success paths too */
}

int main(void)
{
    test_basic();
    test_bare();
    test_local_part();
    test_domain();
    test_route();
    test_literals();
    test_utf8();
    test_helpers();
    test_local_plain();
    test_fuzz();
    CHECK_DONE();
}
