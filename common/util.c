/* util.c - bounded string, number and time helpers. */
#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <sys/stat.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

bool str_copy(char *dst, const char *src, size_t n)
{
    size_t len = strlen(src);
    if (n == 0)
        return false;
    if (len >= n) {
        memcpy(dst, src, n - 1);
        dst[n - 1] = '\0';
        return false;
    }
    memcpy(dst, src, len + 1);
    return true;
}

bool str_fmt(char *dst, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(dst, n, fmt, ap);
    va_end(ap);
    return r >= 0 && (size_t)r < n;
}

void str_lower(char *s)
{
    for (; *s; s++)
        *s = (char)tolower((unsigned char)*s);
}

bool str_casestart(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

char *str_trim(char *s)
{
    char *start = s;
    while (*start == ' ' || *start == '\t' || *start == '\r' || *start == '\n')
        start++;
    size_t len = strlen(start);
    while (len > 0 && strchr(" \t\r\n", start[len - 1]))
        len--;
    memmove(s, start, len);
    s[len] = '\0';
    return s;
}

/* Digits followed by an optional one-letter unit; the unit's multiplier is
 * looked up in units ("k1024" style pairs are overkill: a small table). */
static bool parse_scaled(const char *s, const char *letters,
                         const uint64_t *mult, uint64_t *out)
{
    uint64_t v = 0;
    const char *p = s;
    if (!isdigit((unsigned char)*p))
        return false;
    for (; isdigit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    uint64_t m = 1;
    if (*p) {
        const char *u = strchr(letters, *p);
        if (!u || p[1] != '\0')
            return false;
        m = mult[u - letters];
    }
    if (m != 0 && v > UINT64_MAX / m)
        return false;
    *out = v * m;
    return true;
}

bool parse_size(const char *s, uint64_t *out)
{
    static const uint64_t mult[] = {1024, 1024, 1024ULL * 1024,
                                    1024ULL * 1024 * 1024, 1024ULL * 1024 * 1024};
    return parse_scaled(s, "kKMGg", mult, out);
}

bool parse_duration(const char *s, long *out)
{
    static const uint64_t mult[] = {1, 60, 3600, 86400, 604800};
    uint64_t v;
    if (!parse_scaled(s, "smhdw", mult, &v) || v > 100ULL * 365 * 86400)
        return false;
    *out = (long)v;
    return true;
}

bool parse_bool(const char *s, bool *out)
{
    if (!strcasecmp(s, "yes") || !strcasecmp(s, "true") || !strcmp(s, "1") ||
        !strcasecmp(s, "on")) {
        *out = true;
        return true;
    }
    if (!strcasecmp(s, "no") || !strcasecmp(s, "false") || !strcmp(s, "0") ||
        !strcasecmp(s, "off")) {
        *out = false;
        return true;
    }
    return false;
}

bool parse_ulong(const char *s, unsigned long max, unsigned long *out)
{
    static const uint64_t none[] = {0};
    uint64_t v;
    if (!parse_scaled(s, "", none, &v) || v > max)
        return false;
    *out = (unsigned long)v;
    return true;
}

void rfc5322_date(time_t t, char *buf, size_t n)
{
    struct tm tm;
    localtime_r(&t, &tm);
    /* %z is fine in C99 strftime; the day and month names must be the
     * English ones whatever the locale, so spell them out ourselves. */
    static const char *days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *mons[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                 "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    char zone[8];
    strftime(zone, sizeof zone, "%z", &tm);
    snprintf(buf, n, "%s, %d %s %d %02d:%02d:%02d %s", days[tm.tm_wday % 7],
             tm.tm_mday, mons[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour,
             tm.tm_min, tm.tm_sec, zone);
}

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        p += w;
        len -= (size_t)w;
    }
    return true;
}

bool fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return false;
    bool ok = fsync(fd) == 0;
    int saved = errno;
    close(fd);
    errno = saved;
    return ok;
}

void system_fqdn(char *buf, size_t n)
{
    char host[256] = "localhost";
    if (gethostname(host, sizeof host - 1) != 0)
        str_copy(host, "localhost", sizeof host);
    host[sizeof host - 1] = '\0';
    if (!strchr(host, '.')) {
        /* AI_CANONNAME consults /etc/hosts first; no network is needed. */
        struct addrinfo hints = {.ai_flags = AI_CANONNAME, .ai_family = AF_UNSPEC};
        struct addrinfo *res = NULL;
        if (getaddrinfo(host, NULL, &hints, &res) == 0 && res &&
            res->ai_canonname && strchr(res->ai_canonname, '.'))
            str_copy(host, res->ai_canonname, sizeof host);
        if (res)
            freeaddrinfo(res);
    }
    str_copy(buf, host, n);
}

bool stat_same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino &&
           a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
           a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec &&
           a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}
