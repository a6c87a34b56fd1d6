/* fetch.h - odmr-fetch's modules and what they share (SPEC section 4).
 *
 *   fetch_main.c     main(): options, lock, the run, summary, exit status
 *   fetch_conf.c     command line, configuration file, password
 *   lock.c           one run at a time (flock)
 *   net.c            connecting with a timeout; the -vv protocol trace
 *   fetch_session.c  provider side: greeting, EHLO, STARTTLS, AUTH, ATRN
 *   tls_cache.c      the TLS session kept between runs (resumption)
 *   receiver.c       after the reversal: the SMTP server odmrd talks to
 *   deliver.c        delivery targets (target.h), smtp/lmtp in
 *                    target_smtp.c, mda in target_mda.c, maildir in
 *                    target_maildir.c
 */
#ifndef ODMR_FETCH_H
#define ODMR_FETCH_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sysexits.h>

#include "../common/connect.h"
#include "../common/io.h"
#include "../common/smtp.h"
#include "../common/util.h"

#define FETCH_DEFAULT_PORT 366        /* RFC 2645 section 4 */
#define FETCH_DEFAULT_TIMEOUT 300
#define FETCH_TIMEOUT_MAX 86400       /* a day: anything longer is a typo */
#define FETCH_LINGER_MAX 86400        /* XLINGER: a day per connection */
#define FETCH_HOST_MAX 256
#define FETCH_USER_MAX 256
#define FETCH_PASSWORD_MAX 1024
#define FETCH_MECHS_MAX 256
/* The server accepts at most 100 domains in one ATRN, and the command
 * line must fit in 512 octets (RFC 5321 4.5.3.1.4). */
#define FETCH_DOMAINS_MAX 100
#define FETCH_TARGET_ARG_MAX 4096

enum tls_mode { TLS_REQUIRE, TLS_AUTO, TLS_OFF };

enum target_kind { TARGET_SMTP, TARGET_LMTP, TARGET_MDA, TARGET_MAILDIR };

/* --deliver TARGET, parsed. */
struct target_spec {
    enum target_kind kind;
    char host[FETCH_HOST_MAX];     /* smtp/lmtp over TCP */
    unsigned port;
    char path[PATH_MAX];           /* lmtp unix socket; "" for TCP */
    char arg[FETCH_TARGET_ARG_MAX];/* mda command / maildir template */
    char text[FETCH_TARGET_ARG_MAX + 16];   /* as given, for messages */
};

struct fetch_conf {
    char server[FETCH_HOST_MAX];   /* host name or address literal */
    unsigned port;
    char user[FETCH_USER_MAX];
    char password[FETCH_PASSWORD_MAX + 1];   /* wiped before exit */
    char password_file[PATH_MAX];
    char mechanisms[FETCH_MECHS_MAX];        /* "" = any */
    enum tls_mode tls;
    char ca_file[PATH_MAX];
    struct target_spec target;
    char domains[SMTP_LINE_MAX];  /* comma-joined ATRN argument, "" = all */
    size_t ndomains;
    long timeout;                 /* seconds */
    long linger;                  /* XLINGER seconds (push delivery), 0 off */
    char lock_file[PATH_MAX];
    int verbose;                  /* 0 quiet, 1 summary, 2 trace */
    char fqdn[FETCH_HOST_MAX];    /* our name in EHLO and greetings */
};

/* ---- fetch_conf.c ---- */

/* Reads the command line, the configuration file and the password.
 * Returns 0 to run, -1 when --help/--version was answered (exit 0), or an
 * exit status (64 usage, 78 configuration) after printing the reason. */
int conf_load(struct fetch_conf *c, int argc, char **argv);
/* Parses "smtp:HOST:PORT" etc.; false with a reason in err. */
bool target_parse(const char *text, struct target_spec *t, char *err,
                  size_t n);
/* "HOST", "HOST:PORT", "[V6]:PORT", "V6" -> host and port (default_port
 * when absent); false on bad syntax. */
bool hostport_parse(const char *s, unsigned default_port, char *host,
                    size_t n, unsigned *port);

/* ---- lock.c ---- */

/* Takes the run lock without waiting.  Returns the locked descriptor (it
 * stays locked until exit), -2 when another process holds the lock, or
 * -1 with a reason in err. */
int lock_take(const char *path, char *err, size_t n);
/* The default lock file (the TLS session is kept beside it), the first
 * of: /run/odmr-fetch/odmr-fetch.lock when that directory is ours and
 * only ours to write (the systemd units' RuntimeDirectory);
 * $XDG_RUNTIME_DIR/odmr-fetch.lock; for root /run/odmr-fetch.lock (when
 * /run is root's and only root's to write); ~/.odmr-fetch.lock
 * when the home directory (from the password database) is ours and only
 * ours to write; else /tmp/odmr-fetch-UID.lock, in a shared directory. */
void lock_default_path(char *buf, size_t n);
/* lock_default_path's choice among given places (for the tests). */
struct lock_places {
    const char *runtime;   /* $XDG_RUNTIME_DIR, or NULL */
    const char *run_dir;   /* /run/odmr-fetch */
    const char *run;       /* /run, root's runtime directory */
    const char *home;      /* the user's home directory, or NULL */
    const char *tmp;       /* /tmp */
    uid_t uid;
};
void lock_pick_path(char *buf, size_t n, const struct lock_places *p);

/* ---- net.c ---- */

/* net_connect(): common/connect.h (a failure is worth retrying: exit 75) */

/* The -vv trace on stderr: who is "provider" or "target", out says
 * which way the line went.  Lines are cleaned of control characters. */
void trace_set(bool on);
bool trace_on(void);
void trace_line(const char *who, bool out, const char *line);

/* Sends "line\r\n" on io, traced as shown (NULL: as it is); false on
 * failure. */
bool net_send(struct io *io, const char *who, const char *line,
              const char *shown);
/* Reads one complete reply (all its lines).  Returns IO_OK, an io_status,
 * or IO_ERROR for a malformed reply (*malformed set). */
int net_reply(struct io *io, const char *who, struct smtp_reply *r,
              bool *malformed);

/* ---- fetch_session.c ---- */

struct fetch_stats {
    unsigned long messages;        /* accepted with 250 after the data */
    unsigned long deferred;        /* transactions/recipients given 4xx */
    unsigned long rejected;        /* ... given 5xx */
    unsigned long long bytes;      /* message bytes accepted */
};

/* The whole run after the lock: connect, TLS, AUTH, ATRN, and the
 * reversed session.  Returns the exit status. */
int fetch_run(const struct fetch_conf *c, struct fetch_stats *st);

/* ---- tls_cache.c ---- */

/* The saved TLS session of one provider (server + port), next to the lock
 * file; see tls_cache.c for what invalidates it. */
struct tls_cache {
    char path[PATH_MAX];
    char settings[65];   /* SHA-256 hex of the verification settings */
    bool ready;          /* false: not kept (reported once) */
    int verbose;
    long long full_at;   /* time of the full handshake behind the session
                            loaded (0: none) */
};

/* Works out the file name and the settings' fingerprint. */
bool tls_cache_init(struct tls_cache *tc, const struct fetch_conf *c);
/* The saved session to offer, or NULL (none, or discarded with a reason on
 * stderr when the file was corrupt, -v when it was merely outdated).
 * The caller frees it with SSL_SESSION_free. */
SSL_SESSION *tls_cache_load(struct tls_cache *tc);
/* Saves every session the server hands out on ctx (TLS 1.3 tickets come
 * after the handshake) from a verified connection. */
void tls_cache_attach(struct tls_cache *tc, SSL_CTX *ctx);
/* Deletes the saved session. */
void tls_cache_discard(struct tls_cache *tc);

/* ---- receiver.c ---- */

/* Serves odmrd on io after the 250 to ATRN (the connection is ours to
 * greet).  Returns the exit status: 0 when the session ended with QUIT
 * and nothing was deferred, 76 when odmrd sent too many bad commands,
 * 75 otherwise (something stays queued at the provider). */
int receiver_run(const struct fetch_conf *c, struct io *io,
                 struct fetch_stats *st);

#endif
