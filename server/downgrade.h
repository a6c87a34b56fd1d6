/* downgrade.h - 8-bit to 7-bit conversion of a queued message for a
 * customer that does not offer 8BITMIME (RFC 6152 section 3).
 *
 * Every MIME leaf part whose body holds 8-bit octets and whose transfer
 * encoding is an identity one (7bit, 8bit, binary or none) is re-encoded
 * as quoted-printable (RFC 2045 6.7); multipart and message/rfc822 parts
 * are walked into.  A message without MIME-Version is one text/plain
 * part, which gains MIME headers with charset=unknown-8bit (RFC 1428)
 * when it needs converting.  Octets that no MIME rule can turn into
 * 7 bits (raw 8-bit header text, a base64 part holding 8-bit octets) are
 * left alone and reported, so the caller can log them.
 *
 * Two passes over the queue file: downgrade_plan() finds the parts that
 * need converting and the size afterwards, downgrade_write() produces the
 * converted message.  Both stream, with bounded memory. */
#ifndef ODMR_DOWNGRADE_H
#define ODMR_DOWNGRADE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DOWNGRADE_MAX_DEPTH 32        /* nested multiparts walked into */
#define DOWNGRADE_MAX_PARTS 100000    /* leaf parts looked at */
#define DOWNGRADE_HEADER_MAX 65536    /* one part's header block */

struct dg_plan {
    bool has_8bit;        /* the message holds any 8-bit octet */
    bool convert;         /* downgrade_write() changes something */
    bool residual_8bit;   /* 8-bit octets that remain after conversion */
    uint64_t size;        /* size of downgrade_write()'s output */
    unsigned char *leaf_8bit;   /* per leaf part: converted */
    size_t nleaves;
};

/* Receives converted output; false stops the conversion. */
typedef bool (*dg_sink)(void *ctx, const char *p, size_t len);

/* Reads the message in fd from its start and fills plan.  False on a
 * read error or when memory runs out (errno set). */
bool downgrade_plan(int fd, struct dg_plan *plan);

/* Writes the message in fd, converted as plan says, to sink.  False on a
 * read error or when sink returned false. */
bool downgrade_write(int fd, const struct dg_plan *plan, dg_sink sink, void *ctx);

void downgrade_free(struct dg_plan *plan);

#endif
