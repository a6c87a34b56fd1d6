/* log.h - logging to syslog (facility mail) and optionally stderr.
 * Convention (Postfix style): every line about a message starts with its
 * queue id followed by ": ".  Never pass secrets to these functions. */
#ifndef ODMR_LOG_H
#define ODMR_LOG_H

#include <stdbool.h>

#include "util.h"

void log_open(const char *ident, bool to_stderr, bool debug);
bool log_debug_enabled(void);
void log_info(const char *fmt, ...) PRINTF_LIKE(1, 2);
void log_warn(const char *fmt, ...) PRINTF_LIKE(1, 2);
void log_err(const char *fmt, ...) PRINTF_LIKE(1, 2);
void log_debug(const char *fmt, ...) PRINTF_LIKE(1, 2);

#endif
