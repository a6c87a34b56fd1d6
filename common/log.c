/* log.c - syslog (facility mail) plus stderr in the foreground (unless
 * stderr is the systemd journal, which syslog reaches already). */
#include "log.h"

#include <paths.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static bool log_stderr;
static bool log_journal;   /* stderr is the journal */
static bool log_debugging;
static const char *log_ident = "odmr";

/* Under systemd stderr may be a stream to the journal, which then names
 * its device and inode in JOURNAL_STREAM (systemd.exec(5)). */
static bool stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    char end;
    return js && sscanf(js, "%llu:%llu%c", &dev, &ino, &end) == 2 &&
           fstat(STDERR_FILENO, &st) == 0 &&
           (unsigned long long)st.st_dev == dev &&
           (unsigned long long)st.st_ino == ino;
}

void log_open(const char *ident, bool to_stderr, bool debug)
{
    log_ident = ident;
    log_stderr = to_stderr;
    log_journal = to_stderr && stderr_is_journal();
    log_debugging = debug;
    openlog(ident, LOG_PID | LOG_NDELAY, LOG_MAIL);
}

bool log_debug_enabled(void)
{
    return log_debugging;
}

/* Without a syslog socket (a container, a chroot) glibc's syslog() tries
 * to connect on every call: three syscalls per line, a tenth of a drained
 * message's.  So the socket's presence is looked up at most once a second,
 * and a syslog daemon that starts later is still found. */
static bool syslog_present(void)
{
    static int64_t checked_ms;
    static bool present;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    if (!checked_ms || now - checked_ms >= 1000) {
        present = access(_PATH_LOG, F_OK) == 0;
        checked_ms = now;
    }
    return present;
}

static void log_v(int prio, const char *level, const char *fmt, va_list ap)
{
    char line[2048];
    vsnprintf(line, sizeof line, fmt, ap);
    /* Protocol traces may carry control characters; never let them reach
     * a terminal or split a syslog line. */
    for (char *p = line; *p; p++)
        if ((unsigned char)*p < 32)
            *p = '?';
    /* skipped only while stderr gets the line: nothing is lost */
    bool to_syslog = !log_stderr || syslog_present();
    if (to_syslog)
        syslog(prio, "%s%s", level, line);
    /* The journal has the syslog copy, with facility mail and the
     * priority: a stderr copy would show every line twice. */
    if (log_stderr && !(log_journal && to_syslog))
        fprintf(stderr, "%s[%ld]: %s%s\n", log_ident, (long)getpid(), level,
                line);
}

#define LOG_FN(name, prio, level)                                          \
    void name(const char *fmt, ...)                                        \
    {                                                                      \
        va_list ap;                                                        \
        va_start(ap, fmt);                                                 \
        log_v(prio, level, fmt, ap);                                       \
        va_end(ap);                                                        \
    }

LOG_FN(log_info, LOG_INFO, "")
LOG_FN(log_warn, LOG_WARNING, "warning: ")
LOG_FN(log_err, LOG_ERR, "error: ")

void log_debug(const char *fmt, ...)
{
    if (!log_debugging)
        return;
    va_list ap;
    va_start(ap, fmt);
    log_v(LOG_DEBUG, "debug: ", fmt, ap);
    va_end(ap);
}
