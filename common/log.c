/* log.c - syslog (facility mail) plus stderr in the foreground. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>
#include <unistd.h>

static bool log_stderr;
static bool log_debugging;
static const char *log_ident = "odmr";

void log_open(const char *ident, bool to_stderr, bool debug)
{
    log_ident = ident;
    log_stderr = to_stderr;
    log_debugging = debug;
    openlog(ident, LOG_PID | LOG_NDELAY, LOG_MAIL);
}

bool log_debug_enabled(void)
{
    return log_debugging;
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
    syslog(prio, "%s%s", level, line);
    if (log_stderr)
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
