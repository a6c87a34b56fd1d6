/* conf.h - odmrd.conf (SPEC 3.1): every key, its default and validation.
 * Shared by odmrd and odmrctl (which needs spool_dir and accounts_db). */
#ifndef ODMR_CONF_H
#define ODMR_CONF_H

/* odmr_max_lingering not given: derived from odmr_max_connections */
#define LINGER_DERIVE ((unsigned long)-1)

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <limits.h>

#ifndef SYSCONFDIR
#define SYSCONFDIR "/etc"
#endif
#define ODMRD_CONF_DEFAULT SYSCONFDIR "/odmr/odmrd.conf"

#define LISTEN_MAX 8
#define MILTERS_MAX 8

/* What a session does when a milter is down, too slow or breaks the
 * protocol (milter_default_action). */
enum milter_failure {
    MILTER_FAIL_TEMPFAIL,   /* 4xx: the client tries again later */
    MILTER_FAIL_ACCEPT,     /* go on as if that milter were not configured */
    MILTER_FAIL_REJECT,     /* 5xx */
};

struct milter_addr {
    char name[300];        /* as configured ("inet:127.0.0.1:11332"), for logs */
    bool is_unix;
    char host[256];        /* address or unix socket path */
    char port[8];
};

struct listen_addr {
    bool is_unix;
    char host[256];        /* "0.0.0.0", "::" or a unix socket path */
    char port[8];
};

struct odmrd_conf {
    char path[PATH_MAX];
    char hostname[256];
    struct listen_addr odmr_listen[LISTEN_MAX];
    size_t n_odmr_listen;
    struct listen_addr smtp_listen[LISTEN_MAX];
    size_t n_smtp_listen;
    struct listen_addr lmtp_listen[LISTEN_MAX];
    size_t n_lmtp_listen;
    char spool_dir[PATH_MAX];
    char accounts_db[PATH_MAX];
    char tls_cert_file[PATH_MAX];
    char tls_key_file[PATH_MAX];
    bool require_tls;
    char sasl_mechanisms[512];
    uint64_t max_message_size;
    unsigned long max_recipients;
    uint64_t domain_quota;
    long queue_lifetime;
    char bounce_relay_host[256];
    char bounce_relay_port[8];
    unsigned long max_connections;
    unsigned long max_connections_per_ip;   /* per service */
    /* Session budgets per service inside max_connections; 0 in the file
     * is never stored: conf_load derives unset ones (conf.c). */
    unsigned long smtp_max_connections;
    unsigned long lmtp_max_connections;
    unsigned long odmr_max_connections;
    long timeout;                    /* per read or write, seconds */
    long command_deadline;           /* a whole command line, seconds */
    unsigned long data_min_rate;     /* DATA bytes/s beyond timeout; 0 off */
    unsigned long auth_failure_limit;   /* per client address and window */
    /* push delivery (XLINGER, linger.h) */
    long odmr_linger_max;            /* seconds a session may linger, 0 off */
    long odmr_linger_noop;           /* NOOP after this much silence */
    unsigned long odmr_max_lingering;   /* lingering sessions at once */
    long auth_failure_window;        /* seconds */
    char user[64];
    char pid_file[PATH_MAX];
    /* mail filters on smtp and lmtp intake, applied in order */
    struct milter_addr milters[MILTERS_MAX];
    size_t n_milters;
    enum milter_failure milter_default_action;
    long milter_connect_timeout;     /* seconds: connect and OPTNEG */
    long milter_command_timeout;     /* seconds: each SMTP-stage exchange */
    long milter_content_timeout;     /* seconds: headers, body, end of message */
    unsigned long milter_protocol;   /* 2..6 */
};

/* Fills defaults, then reads path.  Every problem is passed to report()
 * as "file:line: message" (or "file: message").  Returns the number of
 * problems (0 = usable). */
int conf_load(struct odmrd_conf *c, const char *path,
              void (*report)(void *ctx, const char *msg), void *ctx);
void conf_defaults(struct odmrd_conf *c);

#endif
