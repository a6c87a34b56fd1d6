/* test_downgrade.c - the 8-bit to 7-bit MIME conversion (server/downgrade.c)
 * that odmrd applies for a customer without 8BITMIME (RFC 6152 section 3).
 * Checks that converted output is 7-bit, that quoted-printable lines keep
 * to 76 characters, that decoding gives back the original octets, and
 * that parts which must not be touched are left byte for byte. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../server/downgrade.h"
#include "check.h"

struct buf {
    char *p;
    size_t len, cap;
};

static bool buf_sink(void *ctx, const char *p, size_t len)
{
    struct buf *b = ctx;
    if (b->len + len + 1 > b->cap) {
        b->cap = (b->len + len + 1) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p)
            abort();
    }
    memcpy(b->p + b->len, p, len);
    b->len += len;
    b->p[b->len] = '\0';
    return true;
}

/* data, then 8-bit octets that are not the message, as a queue file's
 * envelope follows its data (server/qfile.h): the walk must stop at len. */
#define AFTER_DATA "\r\n\xe9t\xe9 NOT-THE-MESSAGE\r\n"

static int file_with(const char *data, size_t len)
{
    FILE *f = tmpfile();
    if (!f)
        abort();
    int fd = dup(fileno(f));
    fclose(f);
    if (fd < 0 || write(fd, data, len) != (ssize_t)len ||
        write(fd, AFTER_DATA, strlen(AFTER_DATA)) != (ssize_t)strlen(AFTER_DATA))
        abort();
    return fd;
}

/* Plans and converts data; out receives the result (the input itself
 * when nothing is converted).  Checks that plan->size is exact. */
static void convert(const char *data, size_t len, struct dg_plan *plan,
                    struct buf *out)
{
    int fd = file_with(data, len);
    memset(out, 0, sizeof *out);
    CHECK(downgrade_plan(fd, len, plan));
    if (plan->convert)
        CHECK(downgrade_write(fd, plan, buf_sink, out));
    else
        buf_sink(out, data, len);
    CHECK(plan->size == out->len);
    CHECK(!out->p || !strstr(out->p, "NOT-THE-MESSAGE"));
    close(fd);
}

static bool all_7bit(const struct buf *b)
{
    for (size_t i = 0; i < b->len; i++)
        if ((unsigned char)b->p[i] & 0x80)
            return false;
    return true;
}

/* Longest line (without CRLF) in p[0..len). */
static size_t longest_line(const char *p, size_t len)
{
    size_t best = 0, cur = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\n') {
            if (cur > 0 && p[i - 1] == '\r')
                cur--;
            best = cur > best ? cur : best;
            cur = 0;
        } else {
            cur++;
        }
    }
    return cur > best ? cur : best;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Decodes quoted-printable p[0..len) into out; false when malformed. */
static bool qp_decode(const char *p, size_t len, struct buf *out)
{
    memset(out, 0, sizeof *out);
    buf_sink(out, "", 0);
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '=') {
            buf_sink(out, p + i, 1);
            continue;
        }
        if (i + 2 < len && p[i + 1] == '\r' && p[i + 2] == '\n') {
            i += 2;
            continue;
        }
        if (i + 2 >= len || hexval(p[i + 1]) < 0 || hexval(p[i + 2]) < 0)
            return false;
        char c = (char)(hexval(p[i + 1]) * 16 + hexval(p[i + 2]));
        buf_sink(out, &c, 1);
        i += 2;
    }
    return true;
}

/* The body (after the first blank line) of text. */
static const char *body_of(const char *text)
{
    const char *b = strstr(text, "\r\n\r\n");
    return b ? b + 4 : text;
}

static void test_seven_bit_untouched(void)
{
    static const char m[] =
        "From: a@b.example\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        "plain = ascii text \r\n";
    struct dg_plan plan;
    struct buf out;
    convert(m, strlen(m), &plan, &out);
    CHECK(!plan.has_8bit);
    CHECK(!plan.convert);
    CHECK(!plan.residual_8bit);
    downgrade_free(&plan);
    free(out.p);
}

static void test_non_mime_message(void)
{
    static const char m[] =
        "From: a@b.example\r\nSubject: caf\xc3\xa9?\r\n"   /* 8-bit header */
        "Content-Type: text/html\r\n\r\n"
        "Gr\xc3\xbc\xc3\x9f" "e = 1 \r\n"
        ".leading dot\r\n";
    struct dg_plan plan;
    struct buf out, dec;
    convert(m, strlen(m), &plan, &out);
    CHECK(plan.has_8bit && plan.convert);
    CHECK(plan.residual_8bit);                       /* the Subject */
    CHECK(plan.problem == DG_HEADER_8BIT);
    CHECK(plan.body_problem == DG_NONE);
    CHECK(strstr(out.p, "MIME-Version: 1.0\r\n") != NULL);
    /* a text Content-Type (and its charset) is kept */
    CHECK(strstr(out.p, "Content-Type: text/html\r\n") != NULL);
    CHECK(strstr(out.p, "unknown-8bit") == NULL);
    CHECK(strstr(out.p, "Content-Transfer-Encoding: quoted-printable\r\n") != NULL);
    CHECK(strstr(out.p, "Subject: caf\xc3\xa9?\r\n") != NULL);
    CHECK_STR(body_of(out.p), "Gr=C3=BC=C3=9Fe =3D 1=20\r\n.leading dot\r\n");
    CHECK(qp_decode(body_of(out.p), strlen(body_of(out.p)), &dec));
    CHECK_STR(dec.p, body_of(m));
    downgrade_free(&plan);
    free(out.p);
    free(dec.p);
}

static void test_non_mime_without_type(void)
{
    static const char m[] = "From: a@b.example\r\n\r\nK\xc3\xb6ln\r\n";
    struct dg_plan plan;
    struct buf out;
    convert(m, strlen(m), &plan, &out);
    CHECK(plan.convert && !plan.residual_8bit);
    CHECK_STR(out.p, "From: a@b.example\r\nMIME-Version: 1.0\r\n"
                     "Content-Type: text/plain; charset=unknown-8bit\r\n"
                     "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                     "K=C3=B6ln\r\n");
    downgrade_free(&plan);
    free(out.p);
}

/* A soft break must not leave "--boundary" at the start of a line: text
 * that was in the middle of a line would become a delimiter. */
static void test_soft_break_before_dashes(void)
{
    char m[512];
    size_t len = (size_t)snprintf(m, sizeof m,
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain; charset=latin1\r\n\r\n"
        "\xe9%s--b\r\n--b--\r\n", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    struct dg_plan plan;
    struct buf out;
    convert(m, len, &plan, &out);
    CHECK(plan.convert);
    CHECK(strstr(out.p, "\r\n--b\r\n--b--") == NULL);
    CHECK(strstr(out.p, "=\r\n=2D-b\r\n--b--\r\n") != NULL);
    downgrade_free(&plan);
    free(out.p);
}

/* In a non-text part a CRLF is data: encoded, except the one before the
 * boundary, which belongs to the delimiter. */
static void test_binary_part(void)
{
    static const char m[] =
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding : binary\r\n\r\n"   /* obsolete blank */
        "\xff\xd8 \r\n\x00\x01\r\n"
        "--b--\r\n";
    struct dg_plan plan;
    struct buf out;
    convert(m, sizeof m - 1, &plan, &out);   /* it holds a NUL */
    CHECK(plan.convert && !plan.residual_8bit);
    CHECK(all_7bit(&out));
    CHECK(strstr(out.p, "binary") == NULL);   /* the old label is gone */
    CHECK(strstr(out.p, "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                        "=FF=D8 =0D=0A=00=01\r\n--b--\r\n") != NULL);
    downgrade_free(&plan);
    free(out.p);
}

/* The delimiter that closes the message needs no CRLF after it. */
static void test_close_delimiter_at_end(void)
{
    static const char m[] =
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\n\r\n\xe9 \r\n--b-- ";
    struct dg_plan plan;
    struct buf out;
    convert(m, strlen(m), &plan, &out);
    CHECK(plan.convert);
    CHECK(out.len > 6 && !memcmp(out.p + out.len - 6, "--b-- ", 6));
    downgrade_free(&plan);
    free(out.p);
}

static const char MULTI[] =
    "From: a@b.example\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed;\r\n boundary=\"outer =x\"\r\n\r\n"
    "preamble\r\n"
    "--outer =x\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\n"
    "first \xc3\xa4 part\r\n"
    "--outer =x\r\n"
    "Content-Type: application/octet-stream\r\n"
    "Content-Transfer-Encoding: base64\r\n\r\n"
    "AAEC\r\n"
    "--outer =x  \r\n"
    "Content-Type: multipart/alternative; boundary=inner\r\n\r\n"
    "--inner\r\n"
    "Content-Type: text/html; charset=utf-8\r\n\r\n"
    "<p>\xe2\x82\xac</p>\r\n"
    "--inner\r\n"
    "Content-Type: text/plain\r\n\r\n"
    "ascii only = fine\r\n"
    "--inner--\r\n"
    "--outer =x\r\n"
    "Content-Type: message/rfc822\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\n"
    "From: c@d.example\r\n"
    "Subject: inner\r\n\r\n"
    "inner body \xc3\xb6\r\n"
    "--outer =x--\r\n"
    "epilogue\r\n";

static void test_multipart(void)
{
    struct dg_plan plan;
    struct buf out;
    convert(MULTI, strlen(MULTI), &plan, &out);
    CHECK(plan.convert);
    CHECK(!plan.residual_8bit);
    CHECK(all_7bit(&out));
    CHECK(strstr(out.p, "Content-Type: text/plain; charset=utf-8\r\n"
                        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                        "first =C3=A4 part\r\n--outer =x\r\n") != NULL);
    CHECK(strstr(out.p, "Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n") != NULL);
    CHECK(strstr(out.p, "Content-Type: text/html; charset=utf-8\r\n"
                        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                        "<p>=E2=82=AC</p>\r\n") != NULL);
    /* a 7-bit part is not re-encoded, even next to 8-bit ones */
    CHECK(strstr(out.p, "Content-Type: text/plain\r\n\r\nascii only = fine\r\n") != NULL);
    CHECK(strstr(out.p, "Content-Type: message/rfc822\r\n"
                        "Content-Transfer-Encoding: 7bit\r\n\r\n"
                        "From: c@d.example\r\n") != NULL);
    CHECK(strstr(out.p, "Subject: inner\r\n"
                        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                        "inner body =C3=B6\r\n--outer =x--\r\nepilogue\r\n") != NULL);
    CHECK(strstr(out.p, "preamble\r\n--outer =x\r\n") != NULL);
    downgrade_free(&plan);
    free(out.p);
}

static void test_encoded_part_is_residual(void)
{
    static const char m[] =
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n\xff\xfe\r\n";
    struct dg_plan plan;
    struct buf out;
    convert(m, strlen(m), &plan, &out);
    CHECK(plan.has_8bit && plan.residual_8bit && !plan.convert);
    CHECK(plan.problem == DG_ENCODED_8BIT && plan.body_problem == DG_ENCODED_8BIT);
    CHECK(out.len == strlen(m) && !memcmp(out.p, m, out.len));
    downgrade_free(&plan);
    free(out.p);
}

static void test_digest_defaults_to_message(void)
{
    static const char m[] =
        "MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
        "--d\r\n\r\n"                               /* message/rfc822 */
        "Subject: one\r\n\r\n"
        "digest body \xc3\xa5\r\n"
        "--d--\r\n";
    struct dg_plan plan;
    struct buf out;
    convert(m, strlen(m), &plan, &out);
    CHECK(plan.convert && !plan.residual_8bit);
    CHECK(strstr(out.p, "--d\r\n\r\nSubject: one\r\n"
                        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                        "digest body =C3=A5\r\n--d--\r\n") != NULL);
    downgrade_free(&plan);
    free(out.p);
}

/* depth multiparts, each the only part of the one around it, around an
 * 8-bit text part (or a 7-bit one). */
static char *nested(int depth, bool eight, size_t *len)
{
    size_t cap = (size_t)depth * 120 + 512, n = 0;
    char *m = malloc(cap);
    n += (size_t)snprintf(m + n, cap - n, "MIME-Version: 1.0\r\n");
    for (int i = 1; i <= depth; i++)
        n += (size_t)snprintf(m + n, cap - n, "Content-Type: multipart/mixed; "
                              "boundary=\"b%d\"\r\n\r\n--b%d\r\n", i, i);
    n += (size_t)snprintf(m + n, cap - n, "Content-Type: text/plain; "
                          "charset=utf-8\r\n\r\n%s\r\n", eight ? "K\xc3\xb6ln" : "Koeln");
    for (int i = depth; i >= 1; i--)
        n += (size_t)snprintf(m + n, cap - n, "--b%d--\r\n", i);
    *len = n;
    return m;
}

/* Postfix's mime_nesting_limit: 100 levels are converted, 101 are not. */
static void test_nesting_limit(void)
{
    static const int depths[] = {1, 60, 99, 100};
    for (size_t k = 0; k < sizeof depths / sizeof depths[0]; k++) {
        size_t len;
        char *m = nested(depths[k], true, &len);
        struct dg_plan plan;
        struct buf out;
        convert(m, len, &plan, &out);
        CHECK(plan.convert && !plan.residual_8bit && plan.problem == DG_NONE);
        CHECK(all_7bit(&out));
        CHECK(strstr(out.p, "Content-Transfer-Encoding: quoted-printable\r\n"
                            "\r\nK=C3=B6ln\r\n--b") != NULL);
        downgrade_free(&plan);
        free(out.p);
        free(m);
    }
    size_t len;
    char *m = nested(DOWNGRADE_MAX_DEPTH + 1, true, &len);
    struct dg_plan plan;
    struct buf out;
    convert(m, len, &plan, &out);
    CHECK(plan.residual_8bit && !plan.convert);
    CHECK(plan.problem == DG_TOO_DEEP && plan.body_problem == DG_TOO_DEEP);
    CHECK(strstr(downgrade_problem_text(plan.problem), "100 multiparts") != NULL);
    downgrade_free(&plan);
    free(out.p);
    free(m);
    /* too deep but all 7-bit: nothing to convert, nothing wrong */
    m = nested(DOWNGRADE_MAX_DEPTH + 1, false, &len);
    convert(m, len, &plan, &out);
    CHECK(!plan.has_8bit && !plan.residual_8bit && plan.problem == DG_NONE);
    downgrade_free(&plan);
    free(out.p);
    free(m);
}

/* The planned reason for data that stays 8-bit. */
static enum dg_problem problem_of(const char *m, size_t len, enum dg_problem *body)
{
    struct dg_plan plan;
    struct buf out;
    convert(m, len, &plan, &out);
    enum dg_problem p = plan.problem;
    *body = plan.body_problem;
    CHECK(plan.residual_8bit == (p != DG_NONE));
    downgrade_free(&plan);
    free(out.p);
    return p;
}

#define MULTI_HEAD "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"

static void test_unconvertible_reasons(void)
{
    static const struct {
        const char *m;
        enum dg_problem problem, body;
    } cases[] = {
        {MULTI_HEAD "--b\r\nContent-Type: text/plain\r\nContent-Disposition: "
         "inline; filename=\"\xc3\xa9.txt\"\r\n\r\nascii\r\n--b--\r\n",
         DG_HEADER_8BIT, DG_NONE},
        {MULTI_HEAD "--b\r\nContent-Type: message/rfc822\r\n\r\n"
         "Subject: \xe9t\xe9\r\n\r\nbody\r\n--b--\r\n", DG_HEADER_8BIT, DG_NONE},
        {MULTI_HEAD "--b\r\nContent-Type: application/pdf\r\n"
         "Content-Transfer-Encoding: base64\r\n\r\nAA\xff\r\n--b--\r\n",
         DG_ENCODED_8BIT, DG_ENCODED_8BIT},
        {MULTI_HEAD "--b\r\nContent-Type: text/plain\r\n"
         "Content-Transfer-Encoding: quoted-printable\r\n\r\n\xe9=3D\r\n--b--\r\n",
         DG_ENCODED_8BIT, DG_ENCODED_8BIT},
        {MULTI_HEAD "--b\r\nContent-Type: message/partial; id=x; number=1\r\n"
         "\r\n\xe9\r\n--b--\r\n", DG_UNENCODABLE_TYPE, DG_UNENCODABLE_TYPE},
        {MULTI_HEAD "--b\r\nContent-Type: multipart/mixed\r\n\r\n\xe9\r\n--b--\r\n",
         DG_UNENCODABLE_TYPE, DG_UNENCODABLE_TYPE},
        /* the first reason found is the one reported */
        {"MIME-Version: 1.0\r\nSubject: \xe9\r\nContent-Type: text/plain\r\n"
         "Content-Transfer-Encoding: base64\r\n\r\n\xe9\r\n",
         DG_HEADER_8BIT, DG_ENCODED_8BIT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        enum dg_problem body;
        enum dg_problem p = problem_of(cases[i].m, strlen(cases[i].m), &body);
        CHECK(p == cases[i].problem);
        CHECK(body == cases[i].body);
        if (p != cases[i].problem)
            printf("    case %zu: problem %d\n", i, (int)p);
    }
    const char *texts[] = {downgrade_problem_text(DG_HEADER_8BIT),
                           downgrade_problem_text(DG_ENCODED_8BIT),
                           downgrade_problem_text(DG_TOO_DEEP),
                           downgrade_problem_text(DG_TOO_MANY_PARTS),
                           downgrade_problem_text(DG_HEADER_TOO_LONG),
                           downgrade_problem_text(DG_UNENCODABLE_TYPE)};
    CHECK(strstr(texts[0], "header text") != NULL);
    CHECK(strstr(texts[1], "already encoded") != NULL);
    for (size_t i = 0; i < 6; i++)
        for (size_t j = i + 1; j < 6; j++)
            CHECK(strcmp(texts[i], texts[j]) != 0);
}

/* A multipart whose delimiter never comes - declared but absent, or a
 * boundary too long to keep - has its whole body where a preamble would
 * be.  That is real text: it stays 8-bit and blocks a 7-bit receiver
 * instead of being replaced by '?' as a preamble is. */
static void test_boundary_never_seen(void)
{
    static const char absent[] =
        MULTI_HEAD "Gr\xc3\xbc\xc3\x9f" "e\r\nno delimiter at all\r\n";
    enum dg_problem body;
    CHECK(problem_of(absent, strlen(absent), &body) == DG_UNENCODABLE_TYPE);
    CHECK(body == DG_UNENCODABLE_TYPE);
    char b[260], m[1024];
    memset(b, 'x', 250);
    b[250] = '\0';
    int n = snprintf(m, sizeof m, "MIME-Version: 1.0\r\nContent-Type: "
                     "multipart/mixed; boundary=\"%s\"\r\n\r\n--%s\r\n"
                     "Content-Type: text/plain; charset=utf-8\r\n\r\n"
                     "Gr\xc3\xbc\xc3\x9f" "e\r\n--%s--\r\n", b, b, b);
    CHECK(n > 0 && (size_t)n < sizeof m);
    CHECK(problem_of(m, (size_t)n, &body) == DG_UNENCODABLE_TYPE);
    /* a nested multipart closed by its parent's delimiter before its own
     * ever came: its text is real */
    static const char nested[] =
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=a\r\n"
        "\r\n--a\r\nContent-Type: multipart/alternative; boundary=b\r\n"
        "\r\nGr\xc3\xbc\xc3\x9f" "e\r\n--a--\r\n";
    CHECK(problem_of(nested, strlen(nested), &body) == DG_UNENCODABLE_TYPE);
    /* a delimiter after an 8-bit preamble: a preamble after all */
    static const char late[] =
        MULTI_HEAD "Pr\xc3\xa4" "ambel\r\n--b\r\n\r\nascii\r\n--b--\r\n";
    CHECK(problem_of(late, strlen(late), &body) == DG_NONE);
}

/* A part header block over DOWNGRADE_HEADER_MAX, and more leaf parts than
 * DOWNGRADE_MAX_PARTS: what follows is not looked into. */
static void test_limits_reported(void)
{
    size_t cap = DOWNGRADE_HEADER_MAX + 4096, n = 0;
    char *m = malloc(cap);
    n += (size_t)snprintf(m, cap, MULTI_HEAD "--b\r\n");
    while (n < DOWNGRADE_HEADER_MAX + 100)
        n += (size_t)snprintf(m + n, cap - n, "X-Filler: %070d\r\n", 0);
    n += (size_t)snprintf(m + n, cap - n, "\r\n\xe9\r\n--b--\r\n");
    enum dg_problem body;
    CHECK(problem_of(m, n, &body) == DG_HEADER_TOO_LONG);
    free(m);

    static const char part[] = "--b\r\n\r\nx\r\n";
    size_t parts = DOWNGRADE_MAX_PARTS + 1;
    cap = sizeof MULTI_HEAD + parts * (sizeof part - 1) + 64;
    m = malloc(cap);
    n = (size_t)snprintf(m, cap, MULTI_HEAD);
    for (size_t i = 0; i < parts; i++) {
        memcpy(m + n, part, sizeof part - 1);
        n += sizeof part - 1;
    }
    m[n - 3] = (char)0xe9;   /* the last part's "x" */
    n += (size_t)snprintf(m + n, cap - n, "--b--\r\n");
    CHECK(problem_of(m, n, &body) == DG_TOO_MANY_PARTS);
    free(m);
}

/* 8-bit preamble and epilogue text, which MIME readers do not show, is
 * made 7-bit rather than blocking the message. */
static void test_preamble_and_epilogue(void)
{
    static const char m[] =
        MULTI_HEAD "Dies ist eine mehrteilige Nachricht \xe2\x80\x93 MIME\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nascii\r\n--b--\r\n"
        "Epilog \xc3\xa4\r\n";
    struct dg_plan plan;
    struct buf out;
    convert(m, strlen(m), &plan, &out);
    CHECK(plan.convert && !plan.residual_8bit && plan.problem == DG_NONE);
    CHECK(all_7bit(&out));
    CHECK(strstr(out.p, "Nachricht ??? MIME\r\n--b\r\n") != NULL);
    CHECK(strstr(out.p, "ascii\r\n--b--\r\nEpilog ??\r\n") != NULL);
    CHECK(out.len == strlen(m));
    downgrade_free(&plan);
    free(out.p);
}

/* Long lines: soft breaks, no line over 76, exact round trip, and a
 * CRLF that falls on the reader's segment edge. */
static void test_long_lines(void)
{
    static const char head[] = "MIME-Version: 1.0\r\n"
                               "Content-Type: text/plain\r\n\r\n";
    size_t sizes[] = {2, 74, 75, 76, 77, 4094, 4095, 4096, 4097, 10000};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        char *m = malloc(sizeof head + 2 * n + 8);
        size_t len = strlen(head);
        memcpy(m, head, len);
        for (size_t i = 0; i < n; i++)   /* 8-bit, "=", blanks mixed */
            m[len++] = "a\xe9= \tb"[i % 6];
        memcpy(m + len, "\r\nz \r\n", 6);
        len += 6;
        struct dg_plan plan;
        struct buf out, dec;
        convert(m, len, &plan, &out);
        CHECK(plan.convert);
        CHECK(all_7bit(&out));
        const char *body = body_of(out.p);
        CHECK(longest_line(body, strlen(body)) <= 76);
        CHECK(qp_decode(body, strlen(body), &dec));
        CHECK(dec.len == len - strlen(head) &&
              !memcmp(dec.p, m + strlen(head), dec.len));
        downgrade_free(&plan);
        free(out.p);
        free(dec.p);
        free(m);
    }
}

/* Random 8-bit bodies in a non-MIME message decode back exactly; random
 * MIME-looking junk never crashes and plan.size stays exact. */
static void test_random(void)
{
    static const char *pieces[] = {
        "--b\r\n", "--b--\r\n", "Content-Type: multipart/mixed; boundary=b\r\n",
        "Content-Type: message/rfc822\r\n", "Content-Transfer-Encoding: 8bit\r\n",
        "Content-Type: multipart/digest; boundary=\"b\"\r\n", "\r\n",
        "MIME-Version: 1.0\r\n", "x\xc3\xa9y \r\n", "=\r\n", "\t\r\n"};
    srand(6152);
    for (int round = 0; round < 400; round++) {
        char m[8192];
        size_t len = 0;
        if (round % 2) {
            len = (size_t)snprintf(m, sizeof m, "Subject: r\r\n\r\n");
            for (int i = rand() % 3000; i > 0; i--) {
                char c = (char)(rand() % 256);
                if (c == '\r' || c == '\n')
                    c = 'x';
                m[len++] = c;
                if (rand() % 50 == 0) {
                    m[len++] = '\r';
                    m[len++] = '\n';
                }
            }
            memcpy(m + len, "\r\n", 2);
            len += 2;
        } else {
            for (int i = rand() % 60; i > 0; i--) {
                const char *p = pieces[rand() % (sizeof pieces / sizeof pieces[0])];
                memcpy(m + len, p, strlen(p));
                len += strlen(p);
            }
        }
        struct dg_plan plan;
        struct buf out, dec;
        convert(m, len, &plan, &out);
        if (round % 2 && plan.convert) {
            const char *body = body_of(out.p);
            CHECK(all_7bit(&out));
            CHECK(qp_decode(body, strlen(body), &dec));
            CHECK(dec.len == len - 14 && !memcmp(dec.p, m + 14, dec.len));
            free(dec.p);
        }
        if (!plan.residual_8bit)
            CHECK(all_7bit(&out));
        downgrade_free(&plan);
        free(out.p);
    }
}

int main(void)
{
    test_seven_bit_untouched();
    test_non_mime_message();
    test_non_mime_without_type();
    test_soft_break_before_dashes();
    test_binary_part();
    test_close_delimiter_at_end();
    test_multipart();
    test_encoded_part_is_residual();
    test_digest_defaults_to_message();
    test_nesting_limit();
    test_unconvertible_reasons();
    test_boundary_never_seen();
    test_limits_reported();
    test_preamble_and_epilogue();
    test_long_lines();
    test_random();
    CHECK_DONE();
}
