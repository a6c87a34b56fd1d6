/* sasl.h - our glue around Cyrus SASL (RFC 4422) for SMTP AUTH (RFC 4954),
 * used by the ODMR session in odmrd (server side) and by odmr-fetch
 * (client side).  Callers see base64 text exactly as it travels in the
 * 334 lines and AUTH arguments, and a small result enum that maps onto
 * SMTP replies; no Cyrus header is needed to use this one.
 *
 * Server, once per process (odmrd master: after log_open, which decides
 * whether Cyrus' debug lines are wanted; before forking and before
 * dropping privileges, as Cyrus loads its plugin libraries here):
 *     sasl_glue_server_init(auxprop_plugin_init, AUXPROP_PLUGIN_NAME, ...)
 *   Cyrus is made hermetic: the password source is only the given auxprop
 *   plugin (pwcheck_method=auxprop, so PLAIN/LOGIN check against it too),
 *   no SASL configuration file (/etc/sasl2/...) and no sasldb file is ever
 *   used, and Cyrus' log lines go to common/log.h (never its password
 *   traces).  Authorization identity must equal the authentication
 *   identity: proxy authorization is refused.
 *
 * Server, per connection:
 *     s = sasl_glue_server_new("smtp", hostname, "127.0.0.1;366",
 *                              "192.0.2.7;40312", tls_active, tls_bits, ...)
 *     sasl_glue_server_mechanisms(s, conf->sasl_mechanisms, list, n)
 *         -> "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5"  (for "250-AUTH ...")
 *     r = sasl_glue_server_start(s, mech, initial_or_NULL, chal, n)
 *     while (r == SASL_GLUE_CONTINUE) {
 *         send "334 <chal>"; read a line; "*" -> 501, stop (session's job)
 *         r = sasl_glue_server_step(s, line, chal, n);
 *     }
 *     SASL_GLUE_OK      -> 235 2.7.0, user = sasl_glue_server_username(s)
 *     SASL_GLUE_FAIL    -> 535 5.7.8 (counts as a failed attempt)
 *     SASL_GLUE_BADMECH -> 504 5.5.4
 *     SASL_GLUE_BADB64  -> 501 5.5.2
 *     SASL_GLUE_ERROR   -> 454 4.7.0 (e.g. account database unreadable)
 *   A new start() after a failure (or after BADB64 / a "*" cancel) begins
 *   a fresh exchange; start() after success returns ERROR (answer 503
 *   before calling it).  After STARTTLS make a new object: the mechanisms
 *   allowed depend on TLS.  Server data that comes with success (SCRAM's
 *   "v=") is sent as one more CONTINUE challenge, answered by an empty
 *   line, as RFC 4954 section 4 requires.
 *
 * Client (odmr-fetch):
 *     sasl_glue_client_init(...) once, then per connection
 *     c = sasl_glue_client_new("smtp", server_host, user, password, ...)
 *     r = sasl_glue_client_start(c, ehlo_auth_list, allowed_or_NULL, tls,
 *                                mech, mech_n, initial, n)
 *         send "AUTH <mech>" or "AUTH <mech> <initial>" when initial != ""
 *     on "334 <text>": r = sasl_glue_client_step(c, text, resp, n);
 *                      send resp (possibly an empty line)
 *     on 235: accept only if sasl_glue_client_complete(c) (for SCRAM this
 *             means the server proved it knows the password too).
 *
 * Mechanism order on the client: SCRAM-SHA-256 > SCRAM-SHA-1 > CRAM-MD5 >
 * PLAIN > LOGIN; PLAIN and LOGIN only inside TLS, on both sides, always.
 * ANONYMOUS is never offered nor used.  No function here logs a secret. */
#ifndef ODMR_SASL_H
#define ODMR_SASL_H

#include <stdbool.h>
#include <stddef.h>

/* Longest base64 text accepted from the peer (RFC 4954 section 4: AUTH
 * lines may be 12288 octets), and a sufficient size for every output
 * buffer below. */
#define SASL_GLUE_B64_MAX 12288
/* Longest mechanism name (RFC 4422 section 3.1: 20 characters). */
#define SASL_GLUE_MECH_MAX 20

enum sasl_glue_result {
    SASL_GLUE_CONTINUE,  /* send the challenge/response, read the next one */
    SASL_GLUE_OK,        /* server: authenticated; client: mechanism done */
    SASL_GLUE_FAIL,      /* bad credentials, or the peer broke the protocol */
    SASL_GLUE_BADMECH,   /* mechanism unknown, not offered, or none common */
    SASL_GLUE_BADB64,    /* the peer's text is not valid base64 */
    SASL_GLUE_ERROR,     /* temporary or internal trouble on our side */
};

const char *sasl_glue_result_name(enum sasl_glue_result r);

/* --- server ------------------------------------------------------------ */

/* Exactly sasl_auxprop_init_t from <sasl/saslplug.h>, spelled with struct
 * tags so that callers need no Cyrus header. */
struct sasl_utils;
struct sasl_auxprop_plug;
typedef int sasl_glue_auxprop_init(const struct sasl_utils *utils,
                                   int max_version, int *out_version,
                                   struct sasl_auxprop_plug **plug,
                                   const char *plugname);

/* Once per process.  plugin_init/plugin_name: the in-process auxprop
 * plugin that is the only password source (server/auxprop.h).  False with
 * a message in err on failure.  Calling it again is harmless. */
bool sasl_glue_server_init(sasl_glue_auxprop_init *plugin_init,
                           const char *plugin_name, char *err, size_t n);
void sasl_glue_server_done(void);

/* What the password source remembers of its lookups (server/auxprop.c
 * registers it from its plugin init; NULL unregisters).  The source
 * answers an unknown name with a stand-in secret that never verifies, so
 * that no reply tells an unknown name from a wrong password; this is how
 * the glue still knows the difference:
 *   forget(): called as every exchange begins, so that what last()
 *     reports belongs to this exchange;
 *   last(): the name of this exchange's last password lookup (NULL when
 *     none happened) and whether that account exists.
 * With it registered, a success is only accepted when last() names the
 * authenticated identity and it exists (a stand-in secret that matched,
 * however unlikely, is refused), and the failure reason says
 * `unknown account "x"` or `wrong password for "x"`. */
struct sasl_glue_accounts {
    void (*forget)(void);
    const char *(*last)(bool *exists);
};
void sasl_glue_server_set_accounts(const struct sasl_glue_accounts *a);

struct sasl_glue_server;

/* service: "smtp" (RFC 4954's service name, used by DIGEST-MD5 and
 * GSSAPI); fqdn: our host name; local/remote: "IP;PORT" or NULL;
 * tls_ssf: the TLS cipher's strength in bits, when tls_active.  Cyrus'
 * own connection object is only made when mechanisms() or start() need
 * it (Cyrus' mechanism list is kept per process and kind of connection),
 * so an object dropped at STARTTLS costs little; Cyrus' errors then come
 * from those calls. */
struct sasl_glue_server *sasl_glue_server_new(const char *service,
                                              const char *fqdn,
                                              const char *local_ipport,
                                              const char *remote_ipport,
                                              bool tls_active,
                                              unsigned tls_ssf, char *err,
                                              size_t n);
void sasl_glue_server_free(struct sasl_glue_server *s);

/* out = the mechanisms of the space- or comma-separated configured list
 * that Cyrus can do on this connection, in the configured order, space
 * separated, upper case; "" when none.  It is also what start() accepts
 * from now on (before the first call start() accepts anything Cyrus
 * offers under the same TLS and ANONYMOUS rules).  False on an internal
 * error or when out is too small. */
bool sasl_glue_server_mechanisms(struct sasl_glue_server *s,
                                 const char *configured, char *out,
                                 size_t n);

/* initial_b64: the AUTH command's initial response; NULL when there was
 * none, "=" for an empty one.  On CONTINUE chal gets the base64 challenge
 * ("" for an empty one). */
enum sasl_glue_result sasl_glue_server_start(struct sasl_glue_server *s,
                                             const char *mech,
                                             const char *initial_b64,
                                             char *chal, size_t n);
/* response_b64: the client's line ("" or "=" both mean empty). */
enum sasl_glue_result sasl_glue_server_step(struct sasl_glue_server *s,
                                            const char *response_b64,
                                            char *chal, size_t n);

/* The authenticated identity after OK, else NULL. */
const char *sasl_glue_server_username(const struct sasl_glue_server *s);
/* The mechanism of the last start(), for logs ("" before). */
const char *sasl_glue_server_mech(const struct sasl_glue_server *s);
/* Why the last start()/step() did not succeed, for logs (no secrets; an
 * account name in it is quoted, with unprintable bytes as \xNN). */
const char *sasl_glue_server_reason(const struct sasl_glue_server *s);

/* --- client ------------------------------------------------------------ */

bool sasl_glue_client_init(char *err, size_t n);
void sasl_glue_client_done(void);

struct sasl_glue_client;

/* user/password are copied; the copies are wiped on free. */
struct sasl_glue_client *sasl_glue_client_new(const char *service,
                                              const char *server_fqdn,
                                              const char *user,
                                              const char *password,
                                              char *err, size_t n);
void sasl_glue_client_free(struct sasl_glue_client *c);

/* The policy alone, without Cyrus: the candidates offered by the server
 * (EHLO AUTH list) and allowed (space- or comma-separated; NULL or "" =
 * any), strongest first, space separated, into out.  False when there is
 * no candidate or out is too small. */
bool sasl_glue_client_candidates(const char *server_mechs,
                                 const char *allowed, bool tls_active,
                                 char *out, size_t n);

/* Starts the strongest candidate that the Cyrus client can do.  mech gets
 * its name; initial gets the initial response: "" = none (send "AUTH
 * MECH"), otherwise send "AUTH MECH <initial>" ("=" is an empty one).
 * Returns CONTINUE (or OK when the mechanism needs nothing more),
 * BADMECH when no mechanism is usable, ERROR otherwise. */
enum sasl_glue_result sasl_glue_client_start(struct sasl_glue_client *c,
                                             const char *server_mechs,
                                             const char *allowed,
                                             bool tls_active, char *mech,
                                             size_t mech_n, char *initial,
                                             size_t n);
/* challenge_b64: the text after "334 ".  resp gets the line to send
 * ("" = an empty line).  FAIL when the server's data is wrong (e.g. a
 * SCRAM server signature that does not verify), BADB64 when it is not
 * base64. */
enum sasl_glue_result sasl_glue_client_step(struct sasl_glue_client *c,
                                            const char *challenge_b64,
                                            char *resp, size_t n);
/* True once the mechanism has finished on our side: check it on 235. */
bool sasl_glue_client_complete(const struct sasl_glue_client *c);

#endif
