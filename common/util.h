/* util.h - small defensive string, number and time helpers shared by all
 * programs.  Everything here is bounded: no function writes past the size
 * it is given, and every parser rejects trailing garbage. */
#ifndef ODMR_UTIL_H
#define ODMR_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct stat;

#define ODMR_VERSION "0.1.0"

/* printf-style argument checking where the compiler offers it. */
#if defined(__GNUC__) || defined(__clang__)
#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))
#else
#define PRINTF_LIKE(f, a)
#endif

/* Copy at most n-1 bytes and always terminate; returns false if truncated. */
bool str_copy(char *dst, const char *src, size_t n);
/* snprintf that reports truncation as false. */
bool str_fmt(char *dst, size_t n, const char *fmt, ...)
    PRINTF_LIKE(3, 4);
void str_lower(char *s);
bool str_casestart(const char *s, const char *prefix);
/* Trim ASCII white space at both ends in place; returns s. */
char *str_trim(char *s);

/* "52428800", "50M", "1G", "10k" -> bytes.  Returns false on bad syntax or
 * overflow. */
bool parse_size(const char *s, uint64_t *out);
/* "300", "300s", "5m", "2h", "5d" -> seconds. */
bool parse_duration(const char *s, long *out);
bool parse_bool(const char *s, bool *out);
/* Plain decimal, no sign, no garbage, <= max. */
bool parse_ulong(const char *s, unsigned long max, unsigned long *out);

/* RFC 5322 date for headers: "Mon, 23 Nov 2026 11:37:24 +0000". */
void rfc5322_date(time_t t, char *buf, size_t n);

/* Monotonic milliseconds, for timeouts. */
int64_t now_ms(void);

/* write() the whole buffer, retrying on EINTR/short writes. */
bool write_all(int fd, const void *buf, size_t len);

/* fsync a directory by path. */
bool fsync_dir(const char *path);

/* System host name, fully qualified when /etc/hosts or the resolver
 * configuration can say so. */
void system_fqdn(char *buf, size_t n);

/* Whether two stats show the same version of the same file: device,
 * inode, size, mtime and ctime (which nothing can set back), for handles
 * and answers kept while a file does not change. */
bool stat_same_file(const struct stat *a, const struct stat *b);

#endif
