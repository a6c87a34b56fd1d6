/* qfile.h - the one-file message: data and envelope in one inode.
 *
 * Guarantee: a queue file q/<domain>/<id>.q is only ever seen whole.  It
 * is written under another name (the data file <id>.m in the domain's
 * directory, or tmp/), synced, and renamed to <id>.q as the commit; a
 * file whose trailer does not describe its own size exactly is refused as
 * damaged, never read as a message.
 *
 * Layout (every length in octets):
 *   [0, data_len)                  the message data, as in a .m file
 *   [data_len, data_len + env_len) the envelope (envelope.h), ending ".\n"
 *   last QFILE_TRAILER_LEN octets  "Q1 <data_len: 16 hex> <env_len: 8 hex>\n"
 *                                  (upper-case hex, fixed width)
 *
 * Why: a message for one domain (nearly all mail) costs one inode, one
 * data sync and one rename within its directory, where a data file plus an
 * envelope file cost two inodes, two syncs and a rename across directories.
 * The data comes first so that it is written as it arrives, before the
 * envelope's size record is known; readers of the data stop at data_len,
 * which is also the envelope's Z record. */
#ifndef ODMR_QFILE_H
#define ODMR_QFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "envelope.h"

#define QFILE_TRAILER_LEN 29
/* An envelope holds at most max_rcpt recipients of about 1.3 KB each: a
 * larger one is damage, and is not read into memory. */
#define QFILE_ENVELOPE_MAX (16u * 1024 * 1024)

/* The trailer for the lengths, QFILE_TRAILER_LEN octets plus a NUL. */
void qfile_trailer(char out[QFILE_TRAILER_LEN + 1], uint64_t data_len,
                   size_t env_len);

/* Parses the trailer at the end of tail (the last n octets of a file of
 * file_size octets): true with both lengths when they add up to
 * file_size exactly, false with a reason in err otherwise. */
bool qfile_parse_trailer(const char *tail, size_t n, uint64_t file_size,
                         uint64_t *data_len, uint64_t *env_len, char *err,
                         size_t en);

/* Parses an envelope text of len octets (not NUL-terminated) that must end
 * with its end marker and name data_len as its size: true, or false with
 * a reason in err (e freed). */
bool qfile_parse_envelope(const char *text, size_t len, uint64_t data_len,
                          struct envelope *e, char *err, size_t en);

/* Reads the envelope of the queue file open on fd: true with the data's
 * length, false with a reason in err (errno EINVAL for damage, another
 * errno for a read error). */
bool qfile_read(int fd, struct envelope *e, uint64_t *data_len, char *err,
                size_t en);

/* Reads only the data's length (usage counts); false + errno. */
bool qfile_data_len(int fd, uint64_t *data_len);

#endif
