/* qfile.c - the one-file message (layout in qfile.h). */
#include "qfile.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void qfile_trailer(char out[QFILE_TRAILER_LEN + 1], uint64_t data_len,
                   size_t env_len)
{
    snprintf(out, QFILE_TRAILER_LEN + 1, "Q1 %016llX %08lX\n",
             (unsigned long long)data_len, (unsigned long)env_len);
}

/* n upper-case hex digits at s; false on anything else. */
static bool hex_field(const char *s, size_t n, uint64_t *v)
{
    *v = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            return false;
        *v = *v << 4 | d;
    }
    return true;
}

bool qfile_parse_trailer(const char *tail, size_t n, uint64_t file_size,
                         uint64_t *data_len, uint64_t *env_len, char *err,
                         size_t en)
{
    if (n < QFILE_TRAILER_LEN || file_size < QFILE_TRAILER_LEN) {
        snprintf(err, en, "shorter than a queue file's trailer");
        return false;
    }
    const char *t = tail + n - QFILE_TRAILER_LEN;
    if (memcmp(t, "Q1 ", 3) || t[19] != ' ' || t[28] != '\n' ||
        !hex_field(t + 3, 16, data_len) || !hex_field(t + 20, 8, env_len)) {
        snprintf(err, en, "no queue file trailer (an unfinished or damaged file)");
        return false;
    }
    /* data_len is at most 2^64-1: compare without overflow */
    uint64_t rest = file_size - QFILE_TRAILER_LEN;
    if (*env_len > rest || *data_len != rest - *env_len) {
        snprintf(err, en, "the trailer's lengths (%llu + %llu) do not match the "
                 "file's size (%llu)", (unsigned long long)*data_len,
                 (unsigned long long)*env_len, (unsigned long long)file_size);
        return false;
    }
    if (*env_len > QFILE_ENVELOPE_MAX) {
        snprintf(err, en, "envelope of %llu octets, over the limit",
                 (unsigned long long)*env_len);
        return false;
    }
    return true;
}

bool qfile_parse_envelope(const char *text, size_t len, uint64_t data_len,
                          struct envelope *e, char *err, size_t en)
{
    envelope_init(e);
    if (len < 2 || memcmp(text + len - 2, ".\n", 2)) {
        snprintf(err, en, "the envelope does not end with its end marker");
        return false;
    }
    FILE *f = fmemopen((void *)text, len, "r");
    if (!f) {
        snprintf(err, en, "%s", strerror(errno));
        return false;
    }
    bool ok = envelope_read(f, e, err, en);
    fclose(f);
    if (ok && e->size != data_len) {
        snprintf(err, en, "the envelope says %llu octets of data, the file "
                 "holds %llu", (unsigned long long)e->size,
                 (unsigned long long)data_len);
        envelope_free(e);
        ok = false;
    }
    return ok;
}

/* pread of exactly n octets at off; false + errno (EINVAL when short). */
static bool read_at(int fd, char *buf, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t got = pread(fd, buf + done, n - done, off + (off_t)done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            if (got == 0)
                errno = EINVAL;   /* shrank under us: damaged */
            return false;
        }
        done += (size_t)got;
    }
    return true;
}

/* The file's size and its last n (at most cap) octets into buf. */
static bool read_tail(int fd, char *buf, size_t cap, uint64_t *size, size_t *n)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return false;
    *size = (uint64_t)st.st_size;
    *n = *size < cap ? (size_t)*size : cap;
    return read_at(fd, buf, *n, (off_t)(*size - *n));
}

/* Most envelopes are a few hundred octets: one read at the end of the
 * file gets the trailer and the envelope together. */
#define TAIL_READ 16384

bool qfile_read(int fd, struct envelope *e, uint64_t *data_len, char *err,
                size_t en)
{
    static char tail[TAIL_READ];
    uint64_t size, env_len;
    size_t n;
    envelope_init(e);
    if (!read_tail(fd, tail, sizeof tail, &size, &n)) {
        snprintf(err, en, "%s", strerror(errno));
        return false;
    }
    if (!qfile_parse_trailer(tail, n, size, data_len, &env_len, err, en)) {
        errno = EINVAL;
        return false;
    }
    if (env_len + QFILE_TRAILER_LEN <= n) {
        const char *text = tail + n - QFILE_TRAILER_LEN - env_len;
        if (qfile_parse_envelope(text, (size_t)env_len, *data_len, e, err, en))
            return true;
        errno = EINVAL;
        return false;
    }
    char *text = malloc((size_t)env_len);
    bool ok = text && read_at(fd, text, (size_t)env_len, (off_t)*data_len);
    if (!ok)
        snprintf(err, en, "%s", text ? strerror(errno) : "out of memory");
    else if (!(ok = qfile_parse_envelope(text, (size_t)env_len, *data_len, e,
                                         err, en)))
        errno = EINVAL;
    free(text);
    return ok;
}

bool qfile_data_len(int fd, uint64_t *data_len)
{
    char tail[QFILE_TRAILER_LEN], err[128];
    uint64_t size, env_len;
    size_t n;
    if (!read_tail(fd, tail, sizeof tail, &size, &n))
        return false;
    if (!qfile_parse_trailer(tail, n, size, data_len, &env_len, err, sizeof err)) {
        errno = EINVAL;
        return false;
    }
    return true;
}
