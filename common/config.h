/* config.h - the "key = value" file format shared by odmrd and odmr-fetch.
 * '#' starts a comment line; blank lines are ignored; values are trimmed.
 * The caller's callback validates each key; every error names file:line. */
#ifndef ODMR_CONFIG_H
#define ODMR_CONFIG_H

#include <stddef.h>

#define CFG_LINE_MAX 4096

/* Return 0 to accept, -1 to reject with a message written to err. */
typedef int (*cfg_cb)(void *ctx, const char *key, const char *value,
                      char *err, size_t errlen);

/* Parses the file; for each error prints "file:line: message" into the
 * error list through report(). Returns the number of errors, or -1 if the
 * file cannot be read (message in err). */
typedef void (*cfg_report)(void *ctx, const char *msg);
int cfg_parse_file(const char *path, cfg_cb cb, cfg_report report, void *ctx,
                   char *err, size_t errlen);

#endif
