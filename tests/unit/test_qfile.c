/* test_qfile.c - the one-file message's trailer and envelope parsers
 * (server/qfile.c): lengths that must add up to the file's size exactly,
 * fixed-width upper-case hex only, no overflow near 2^64, envelopes that
 * must end with their marker and name the data's size. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "../../server/qfile.h"
#include "check.h"

static bool parse(const char *tail, uint64_t file_size, uint64_t *d, uint64_t *e)
{
    char err[256];
    return qfile_parse_trailer(tail, strlen(tail), file_size, d, e, err, sizeof err);
}

static void test_trailer_round_trip(void)
{
    char t[QFILE_TRAILER_LEN + 1];
    uint64_t d, e;
    qfile_trailer(t, 7, 100);
    CHECK(strlen(t) == QFILE_TRAILER_LEN);
    CHECK(!strcmp(t, "Q1 0000000000000007 00000064\n"));
    CHECK(parse(t, 7 + 100 + QFILE_TRAILER_LEN, &d, &e) && d == 7 && e == 100);
    /* one octet more or less in the file: damaged */
    CHECK(!parse(t, 7 + 100 + QFILE_TRAILER_LEN + 1, &d, &e));
    CHECK(!parse(t, 7 + 100 + QFILE_TRAILER_LEN - 1, &d, &e));
    qfile_trailer(t, 0, 0);
    CHECK(parse(t, QFILE_TRAILER_LEN, &d, &e) && d == 0 && e == 0);
}

static void test_trailer_refusals(void)
{
    uint64_t d, e;
    char err[256];
    CHECK(!parse("q1 0000000000000007 00000064\n", 136, &d, &e));   /* magic */
    CHECK(!parse("Q1 000000000000000a 00000064\n", 139, &d, &e));   /* lower case */
    CHECK(!parse("Q1 0000000000000007 0000064\n", 135, &d, &e));    /* width */
    CHECK(!parse("Q1 0000000000000007 00000064 ", 136, &d, &e));    /* no LF */
    CHECK(!parse("Q1 0000000000000007+00000064\n", 136, &d, &e));
    CHECK(!parse("Q1 -000000000000007 00000064\n", 136, &d, &e));
    CHECK(!parse("", 0, &d, &e));
    /* near 2^64: the sum must not wrap around to the file's size */
    CHECK(!parse("Q1 FFFFFFFFFFFFFFFF 00000002\n", 30, &d, &e));
    CHECK(!parse("Q1 0000000000000000 FFFFFFFF\n", 30, &d, &e));
    /* an envelope over the limit is not read */
    char t[QFILE_TRAILER_LEN + 1];
    qfile_trailer(t, 1, QFILE_ENVELOPE_MAX + 1);
    CHECK(!qfile_parse_trailer(t, QFILE_TRAILER_LEN,
                               1 + QFILE_ENVELOPE_MAX + 1 + QFILE_TRAILER_LEN,
                               &d, &e, err, sizeof err));
    CHECK(strstr(err, "limit") != NULL);
    /* only the last QFILE_TRAILER_LEN octets count */
    CHECK(parse("junk before Q1 0000000000000001 00000002\n",
                1 + 2 + QFILE_TRAILER_LEN, &d, &e) && d == 1 && e == 2);
}

#define ENV "V 1\nI ABC\nD example.org\nT 1700000000\nF a@src.test\nZ 7\n" \
            "C 127.0.0.1\nH h\nA 0 0\nR u@example.org\t0\t-\t-\n.\n"

static void test_envelope(void)
{
    struct envelope e;
    char err[256];
    CHECK(qfile_parse_envelope(ENV, strlen(ENV), 7, &e, err, sizeof err));
    CHECK(e.nrcpt == 1 && e.size == 7 && !strcmp(e.id, "ABC"));
    envelope_free(&e);
    /* the size record must be the data's length */
    CHECK(!qfile_parse_envelope(ENV, strlen(ENV), 8, &e, err, sizeof err));
    CHECK(strstr(err, "7 octets") != NULL);
    /* cut short: no end marker */
    CHECK(!qfile_parse_envelope(ENV, strlen(ENV) - 2, 7, &e, err, sizeof err));
    CHECK(strstr(err, "end marker") != NULL);
    CHECK(!qfile_parse_envelope(ENV, 1, 7, &e, err, sizeof err));
    CHECK(!qfile_parse_envelope("V 2\n.\n", 6, 0, &e, err, sizeof err));
}

int main(void)
{
    test_trailer_round_trip();
    test_trailer_refusals();
    test_envelope();
    CHECK_DONE();
}
