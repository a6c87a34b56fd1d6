/* downgrade.h - 8-bit to 7-bit conversion of a queued message for a
 * customer that does not offer 8BITMIME (RFC 6152 section 3).
 *
 * Every MIME leaf part whose body holds 8-bit octets and whose transfer
 * encoding is an identity one (7bit, 8bit, binary or none) is re-encoded
 * as quoted-printable (RFC 2045 6.7); multipart and message/rfc822 parts
 * are walked into.  A message without MIME-Version is one text/plain
 * part, which gains MIME headers with charset=unknown-8bit (RFC 1428)
 * when it needs converting.  The preamble and epilogue of a multipart
 * are not shown by MIME readers (RFC 2046 5.1.1), so 8-bit octets there
 * become "?".  Octets that no MIME rule can turn into 7 bits (raw 8-bit
 * header text, a base64 part holding 8-bit octets, parts beyond the
 * nesting limit, ...) are left alone and reported with the reason
 * (enum dg_problem): such a message must not go to a 7-bit receiver.
 *
 * Two passes over the queue file: downgrade_plan() finds the parts that
 * need converting and the size afterwards, downgrade_write() produces the
 * converted message.  Both stream, with bounded memory. */
#ifndef ODMR_DOWNGRADE_H
#define ODMR_DOWNGRADE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Nested multiparts walked into: Postfix's mime_nesting_limit. */
#define DOWNGRADE_MAX_DEPTH 100
#define DOWNGRADE_MAX_PARTS 100000    /* leaf parts looked at */
#define DOWNGRADE_HEADER_MAX 65536    /* one part's header block */

/* Why 8-bit octets cannot be made 7-bit. */
enum dg_problem {
    DG_NONE = 0,
    DG_HEADER_8BIT,       /* raw 8-bit header text (no MIME rule for it) */
    DG_ENCODED_8BIT,      /* inside a part already encoded (base64, ...) */
    DG_TOO_DEEP,          /* below more than DOWNGRADE_MAX_DEPTH multiparts */
    DG_TOO_MANY_PARTS,    /* after DOWNGRADE_MAX_PARTS leaf parts */
    DG_HEADER_TOO_LONG,   /* in a part whose header block is too long */
    DG_UNENCODABLE_TYPE,  /* in a part that must not be encoded (multipart
                             without boundary, message/partial, ...) */
};

struct dg_plan {
    bool has_8bit;        /* the message holds any 8-bit octet */
    bool convert;         /* downgrade_write() changes something */
    bool residual_8bit;   /* 8-bit octets that remain after conversion */
    enum dg_problem problem;        /* the first of those, or DG_NONE */
    enum dg_problem body_problem;   /* the same, header text not counted */
    bool filler_8bit;     /* 8-bit preamble/epilogue text, replaced */
    uint64_t size;        /* size of downgrade_write()'s output */
    uint64_t data_len;    /* octets of fd that are the message */
    unsigned char *leaf_8bit;   /* per leaf part: converted */
    size_t nleaves;
};

/* Receives converted output; false stops the conversion. */
typedef bool (*dg_sink)(void *ctx, const char *p, size_t len);

/* Reads the message, the first len octets of fd, and fills plan.  False
 * on a read error or when memory runs out (errno set). */
bool downgrade_plan(int fd, uint64_t len, struct dg_plan *plan);

/* Writes the message in fd, converted as plan says, to sink.  False on a
 * read error or when sink returned false. */
bool downgrade_write(int fd, const struct dg_plan *plan, dg_sink sink, void *ctx);

void downgrade_free(struct dg_plan *plan);

/* One line of text for logs and DSNs, e.g. "8-bit octets in header text". */
const char *downgrade_problem_text(enum dg_problem problem);

#endif
