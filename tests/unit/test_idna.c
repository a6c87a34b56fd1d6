/* test_idna.c - unit tests for common/idna.c (one key per domain). */
#include <stdlib.h>

#include "../../common/idna.h"
#include "check.h"

static char key[IDNA_KEY_MAX + 1];

static void expect_key(const char *domain, const char *want)
{
    enum idna_result r = idna_domain_key(domain, key, sizeof key, NULL);
    CHECK(r == IDNA_OK);
    if (r != IDNA_OK) {
        printf("  input: %s\n", domain);
        return;
    }
    CHECK_STR(key, want);
}

static void expect_fail(const char *domain, enum idna_result want)
{
    const char *why = NULL;
    enum idna_result r = idna_domain_key(domain, key, sizeof key, &why);
    CHECK(r == want);
    CHECK(why != NULL && *why);
    CHECK(key[0] == '\0');
    if (r != want)
        printf("  input: %s (got %d)\n", domain, (int)r);
}

static void test_ascii(void)
{
    expect_key("Example.COM", "example.com");
    expect_key("example.com.", "example.com");
    expect_key("a", "a");
    expect_key("ab--c.example", "ab--c.example");   /* LDH, not IDNA: kept */
    expect_key("123.example", "123.example");
    expect_fail("", IDNA_INVALID);
    expect_fail(".", IDNA_INVALID);
    expect_fail("a..b", IDNA_INVALID);
    expect_fail(".a", IDNA_INVALID);
    expect_fail("a-.b", IDNA_INVALID);
    expect_fail("a_b.c", IDNA_INVALID);
    expect_fail("a/b.c", IDNA_INVALID);
    expect_fail("example.com..", IDNA_INVALID);
}

static void test_lengths(void)
{
    char d[600];
    /* four 63-octet labels: 255 octets, the longest domain there is */
    memset(d, 'a', 255);
    d[63] = d[127] = d[191] = '.';
    d[255] = '\0';
    expect_key(d, d);
    d[254] = '\0';
    d[63] = 'a';   /* a 127-octet label */
    expect_fail(d, IDNA_TOOLONG);
    memset(d, 'a', 256);
    d[63] = d[127] = d[191] = d[254] = '.';
    d[256] = '\0';   /* 256 octets in labels of 63, 63, 63, 62 and 1 */
    expect_fail(d, IDNA_TOOLONG);
    /* a U-label of 60 characters encodes beyond 63 octets */
    strcpy(d, "");
    for (int i = 0; i < 60; i++)
        strcat(d, "\xc3\xbc");
    strcat(d, ".test");
    expect_fail(d, IDNA_TOOLONG);
}

static void test_idna_forms(void)
{
    /* U-label and A-label are the same key; upper case is folded */
    expect_key("\xc3\xbcn\xc3\xaf.test", "xn--n-nga1b.test");
    expect_key("\xc3\x9cN\xc3\x8f.TEST", "xn--n-nga1b.test");
    expect_key("xn--n-nga1b.test", "xn--n-nga1b.test");
    expect_key("XN--N-NGA1B.Test.", "xn--n-nga1b.test");
    expect_key("\xc3\xbcn\xc3\xaf.xn--n-nga1b", "xn--n-nga1b.xn--n-nga1b");
    /* non-transitional: sharp s stays */
    expect_key("fa\xc3\x9f.de", "xn--fa-hia.de");
    expect_key("xn--fa-hia.de", "xn--fa-hia.de");
    /* invalid IDNA */
    expect_fail("\xe2\x98\x83.net", IDNA_INVALID);      /* snowman: DISALLOWED */
    expect_fail("xn--zz.test", IDNA_INVALID);            /* bad punycode */
    expect_fail("xn--a.test", IDNA_INVALID);
    expect_fail("xn--.test", IDNA_INVALID);
    expect_fail("\xff\xfe.test", IDNA_INVALID);           /* not UTF-8 */
    expect_fail("\xe3\x80\x82" "a.test", IDNA_INVALID);   /* U+3002 maps to a dot */
}

static void test_display(void)
{
    char buf[4 * IDNA_KEY_MAX + 1];
    idna_display("xn--n-nga1b.test", buf, sizeof buf);
    CHECK_STR(buf, "\xc3\xbcn\xc3\xaf.test");
    idna_display("example.com", buf, sizeof buf);
    CHECK_STR(buf, "example.com");
    idna_display("xn--zz.test", buf, sizeof buf);   /* not decodable: as is */
    CHECK_STR(buf, "xn--zz.test");
}

/* Every key is a safe file name and a fixed point. */
static void test_random(void)
{
    static const char *const parts[] = {
        "a", "Z", "0", "-", ".", "xn--", "\xc3\xbc", "\xc3\x9f", "\xe2\x98\x83",
        "\xe3\x80\x82", "\xff", "n-nga1b", "\xcc\x88"};
    char d[128], again[IDNA_KEY_MAX + 1];
    srand(7);
    for (int round = 0; round < 3000; round++) {
        d[0] = '\0';
        int n = 1 + rand() % 12;
        for (int i = 0; i < n; i++)
            strcat(d, parts[rand() % (int)(sizeof parts / sizeof parts[0])]);
        if (idna_domain_key(d, key, sizeof key, NULL) != IDNA_OK)
            continue;
        bool safe = key[0] && key[0] != '.' && strlen(key) <= IDNA_KEY_MAX;
        for (const char *p = key; *p; p++)
            safe = safe && ((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
                            *p == '-' || *p == '.');
        if (!safe)
            printf("  unsafe key for %s: %s\n", d, key);
        CHECK(safe);
        CHECK(idna_domain_key(key, again, sizeof again, NULL) == IDNA_OK &&
              !strcmp(again, key));
    }
}

int main(void)
{
    test_ascii();
    test_lengths();
    test_idna_forms();
    test_display();
    test_random();
    CHECK_DONE();
}
