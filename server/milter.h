/* milter.h - the MTA side of the milter protocol (Sendmail's mail filter
 * protocol, version 2 to 6 as Postfix speaks it).
 *
 * Guarantee: nothing a milter sends is trusted.  A packet's length is
 * checked against MILTER_PACKET_MAX before any of it is read, every field
 * of every reply is bounded and checked (NUL-terminated strings inside the
 * packet, reply codes of the right class, actions that were negotiated),
 * and every wait on a milter socket has both a timeout and a deadline.  A
 * milter that is down, too slow or breaks the protocol is logged with its
 * name and yields MILTER_FAILED, which the chain (milter_chain_*) turns
 * into milter_default_action; it never crashes or hangs a session.
 *
 * Two layers:
 *   milter.c       the wire format: packets, OPTNEG, replies (pure, no
 *                  I/O; unit-tested and fuzzed)
 *   milter_chain.c the sockets and the conversation with each configured
 *                  milter, in order, stage by stage (odmrd only) */
#ifndef ODMR_MILTER_H
#define ODMR_MILTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"
#include "../common/smtp.h"

/* Commands (MTA to milter). */
#define SMFIC_ABORT   'A'
#define SMFIC_BODY    'B'
#define SMFIC_CONNECT 'C'
#define SMFIC_MACRO   'D'
#define SMFIC_BODYEOB 'E'
#define SMFIC_HELO    'H'
#define SMFIC_HEADER  'L'
#define SMFIC_MAIL    'M'
#define SMFIC_EOH     'N'
#define SMFIC_OPTNEG  'O'
#define SMFIC_QUIT    'Q'
#define SMFIC_RCPT    'R'
#define SMFIC_DATA    'T'

/* Replies and modifications (milter to MTA). */
#define SMFIR_ADDRCPT     '+'
#define SMFIR_DELRCPT     '-'
#define SMFIR_ADDRCPT_PAR '2'
#define SMFIR_ACCEPT      'a'
#define SMFIR_REPLBODY    'b'
#define SMFIR_CONTINUE    'c'
#define SMFIR_DISCARD     'd'
#define SMFIR_CHGFROM     'e'
#define SMFIR_ADDHEADER   'h'
#define SMFIR_INSHEADER   'i'
#define SMFIR_CHGHEADER   'm'
#define SMFIR_PROGRESS    'p'
#define SMFIR_QUARANTINE  'q'
#define SMFIR_REJECT      'r'
#define SMFIR_SKIP        's'
#define SMFIR_TEMPFAIL    't'
#define SMFIR_REPLYCODE   'y'

/* Actions a milter may take (OPTNEG). */
#define SMFIF_ADDHDRS     0x01u
#define SMFIF_CHGBODY     0x02u
#define SMFIF_ADDRCPT     0x04u
#define SMFIF_DELRCPT     0x08u
#define SMFIF_CHGHDRS     0x10u
#define SMFIF_QUARANTINE  0x20u
#define SMFIF_CHGFROM     0x40u
#define SMFIF_ADDRCPT_PAR 0x80u
#define SMFIF_SETSYMLIST  0x100u

/* Protocol steps a milter may skip or not answer (OPTNEG). */
#define SMFIP_NOCONNECT   0x01u
#define SMFIP_NOHELO      0x02u
#define SMFIP_NOMAIL      0x04u
#define SMFIP_NORCPT      0x08u
#define SMFIP_NOBODY      0x10u
#define SMFIP_NOHDRS      0x20u
#define SMFIP_NOEOH       0x40u
#define SMFIP_NR_HDR      0x80u
#define SMFIP_NOUNKNOWN   0x100u
#define SMFIP_NODATA      0x200u
#define SMFIP_SKIP        0x400u
#define SMFIP_RCPT_REJ    0x800u
#define SMFIP_NR_CONN     0x1000u
#define SMFIP_NR_HELO     0x2000u
#define SMFIP_NR_MAIL     0x4000u
#define SMFIP_NR_RCPT     0x8000u
#define SMFIP_NR_DATA     0x10000u
#define SMFIP_NR_UNKN     0x20000u
#define SMFIP_NR_EOH      0x40000u
#define SMFIP_NR_BODY     0x80000u
#define SMFIP_HDR_LEADSPC 0x100000u

/* What odmrd offers: the modifications it applies, and every step a
 * milter may skip or leave unanswered.  odmrd never passes unknown
 * commands on, so SMFIP_NOUNKNOWN/NR_UNKN cost nothing. */
#define MILTER_ACTIONS_OFFERED                                             \
    (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT |       \
     SMFIF_CHGHDRS | SMFIF_QUARANTINE | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR | \
     SMFIF_SETSYMLIST)
#define MILTER_STEPS_OFFERED                                               \
    (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT |        \
     SMFIP_NOBODY | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NR_HDR |            \
     SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_SKIP | SMFIP_NR_CONN |         \
     SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA |       \
     SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC)

#define MILTER_VERSION_MIN 2
#define MILTER_VERSION_MAX 6
/* The largest packet accepted from a milter (command byte included):
 * libmilter's largest negotiable data size, 1 MiB, plus room. */
#define MILTER_PACKET_MAX (1024u * 1024u + 64u)
/* Body chunks sent to a milter (libmilter's MILTER_CHUNK_SIZE). */
#define MILTER_CHUNK 65535u
/* Longest reply text accepted from SMFIR_REPLYCODE (multi-line). */
#define MILTER_REPLY_MAX 4096

/* Writes the 5-byte packet head (length of cmd + len data bytes, then
 * cmd) into head. */
void milter_packet_head(uint8_t head[5], char cmd, size_t len);

/* Splits one packet off the front of buf (avail bytes).  Returns 1 with
 * *total (head included) when a whole packet is there, 0 when more bytes
 * are needed, -1 with a reason when the length is 0 or over
 * MILTER_PACKET_MAX. */
int milter_frame(const uint8_t *buf, size_t avail, size_t *total, char *err,
                 size_t n);

/* The milter's answer to OPTNEG. */
struct milter_neg {
    uint32_t version, actions, steps;
};

/* The body of the MTA's OPTNEG (12 bytes). */
void milter_optneg_request(uint8_t out[12], uint32_t version, uint32_t actions,
                           uint32_t steps);

/* Checks the milter's OPTNEG reply data (after the command byte) against
 * what was offered; requested actions or steps that were not offered are
 * masked off (and *masked says so).  false + reason when it is unusable. */
bool milter_parse_optneg(const uint8_t *data, size_t len, uint32_t version,
                         struct milter_neg *neg, bool *masked, char *err,
                         size_t n);

/* One reply or modification from a milter.  Strings point into the
 * packet, which the parser checked to hold their terminating NUL. */
struct milter_reply {
    char cmd;                  /* SMFIR_* */
    uint32_t index;            /* SMFIR_INSHEADER, SMFIR_CHGHEADER */
    const char *name;          /* header name */
    const char *value;         /* header value ("" deletes, CHGHEADER) */
    const char *text;          /* reply text, quarantine reason, address */
    const uint8_t *data;       /* SMFIR_REPLBODY */
    size_t len;
};

/* Is cmd an answer that ends a stage (as opposed to a modification or
 * progress)? */
bool milter_reply_final(char cmd);

/* Parses pkt (command byte + data, len bytes; as split by milter_frame
 * without the 4 length bytes).  pkt[len] need not be readable.  false +
 * reason for an unknown command or a malformed one.  The strings of *r
 * point into pkt. */
bool milter_parse_reply(const uint8_t *pkt, size_t len, struct milter_reply *r,
                        char *err, size_t n);

/* Checks a SMFIR_REPLYCODE text: one or more lines "DDD text" / "DDD-text"
 * joined by CRLF, all with the same 4xx or 5xx code (the last with a
 * space or alone), printable otherwise.  Returns the code or 0 + reason. */
int milter_check_replycode(const char *text, char *err, size_t n);

/* Appends name NUL value NUL to out (cap bytes, *len used); false when
 * it does not fit.  For macros, header and address lists. */
bool milter_put_str(uint8_t *out, size_t cap, size_t *len, const char *s);

/* SMFIR_CHGFROM: the new sender addr ("<x@y>", "x@y" or "<>") and its
 * ESMTP args, parsed as MAIL FROM would be into *out.  Kept: the args
 * odmrd stores (BODY, SMTPUTF8, RET, ENVID); SIZE is dropped (the size is
 * the message's own); the others are dropped and named in ignored (space
 * separated, truncated to in bytes).  utf8_ok: the transaction is
 * SMTPUTF8.  false + reason for a bad address or a bad value of a kept
 * arg. */
bool milter_parse_chgfrom(const char *addr, const char *args, bool utf8_ok,
                          struct mail_args *out, char *ignored, size_t in,
                          char *err, size_t n);

/* SMFIR_ADDRCPT_PAR: addr with the args RCPT TO takes (NOTIFY, ORCPT),
 * as one RCPT TO argument "<x@y> NOTIFY=... ORCPT=..." in out (on bytes).
 * Unknown args, bad values and repeats are dropped and named in ignored.
 * The address itself is left to the caller's RCPT checks.  false when
 * the address does not fit in out. */
bool milter_rcpt_with_args(const char *addr, const char *args, char *out,
                           size_t on, char *ignored, size_t in);

/* Header names the milter may add or change: printable ASCII without
 * ':' (RFC 5322 2.2), at most 997 octets. */
bool milter_header_name_ok(const char *name);

/* A header value the milter sets: lines joined by LF or CRLF, each line
 * after the first starting with a space or tab (folding) and holding more
 * than blanks, no other control characters, lines of at most 998 octets. */
bool milter_header_value_ok(const char *name, const char *value);

/* ------------------------------------------------------------ the chain
 * (milter_chain.c, odmrd only).  One chain per SMTP/LMTP session, one
 * connection per configured milter, opened when the session starts.  Every
 * stage goes to each milter in configuration order until one refuses; a
 * milter that accepted the message (SMFIR_ACCEPT) hears nothing more of
 * it; a failed milter is closed for the rest of the session and its
 * failure counts as milter_default_action (logged with its name). */

enum milter_verdict {
    MILTER_CONTINUE,
    MILTER_REJECT,        /* reply holds the 5xx reply */
    MILTER_TEMPFAIL,      /* reply holds the 4xx reply */
    MILTER_DISCARD,       /* accept, then drop (end of message only) */
};

struct milter_result {
    enum milter_verdict verdict;
    char reply[MILTER_REPLY_MAX];   /* lines joined by CRLF */
    char by[300];                   /* the milter that decided */
};

/* A header change, in the order the milters asked for them. */
struct milter_header_edit {
    char cmd;                 /* SMFIR_ADDHEADER, _INSHEADER, _CHGHEADER */
    uint32_t index;
    char *name, *value;
    bool leading_space;       /* value as sent, with its leading space */
};

/* A recipient a milter adds ("<address> [NOTIFY=.. ORCPT=..]", as a RCPT
 * TO argument) or removes (address as sent, <> or not). */
struct milter_rcpt_edit {
    bool add;
    char *addr;
    char by[300];             /* the milter, for the log */
};

/* What milters asked to change at the end of the message. */
struct milter_edits {
    bool sender_set;          /* SMFIR_CHGFROM: the last one wins */
    struct mail_args sender;  /* only the args given are set */
    char sender_by[300];
    struct milter_header_edit *headers;
    size_t nheaders;
    struct milter_rcpt_edit *rcpts;
    size_t nrcpts;
    size_t header_bytes;      /* bounded: MILTER_EDIT_BYTES */
    char quarantine[512];     /* SMFIR_QUARANTINE's reason, or "" */
    char quarantined_by[300];
    int body_fd;              /* replacement body (CRLF lines) or -1 */
    uint64_t body_size;
    bool body_cr;             /* last byte written was CR */
};
#define MILTER_EDIT_BYTES (1024u * 1024u)
#define MILTER_EDITS_MAX 1000

/* Macros the session knows; NULL or "" ones are not sent. */
struct milter_macros {
    const char *hostname;      /* j */
    const char *client_addr, *client_port, *if_addr, *daemon_name;
    const char *helo;
    const char *tls_version, *cipher;
    const char *queue_id;      /* i */
    const char *mail_addr, *rcpt_addr;
};

/* Packets to a milter are gathered and written together: a stage's
 * macros and command in one write, all headers and the end of headers in
 * one, a small body and the end of message in one.  Replies are read in
 * blocks of MILTER_IN_BUF. */
#define MILTER_OUT_BUF 8192u
#define MILTER_IN_BUF 2048u

struct milter_conn {
    const struct milter_addr *addr;
    int fd;                   /* -1: not open (closed, broken or done) */
    uint8_t out[MILTER_OUT_BUF];
    size_t olen;              /* bytes of out not yet written */
    uint8_t in[MILTER_IN_BUF];
    size_t ioff, ilen;        /* in[ioff..ilen) read but not yet used */
    struct milter_neg neg;
    bool broken;              /* failed: milter_default_action from now on */
    bool done_with_message;   /* accepted the message: hears no more of it */
    bool aborted;             /* told SMFIC_ABORT for this message already */
    bool skip_body;           /* SMFIR_SKIP: no more body chunks */
};

struct milter_chain {
    const struct odmrd_conf *conf;
    struct milter_conn conn[MILTERS_MAX];
    size_t n;
    bool in_message;            /* MAIL sent, no end of message or abort yet */
    bool smtputf8;              /* MAIL had SMTPUTF8 */
    const char *queue_id;       /* at the end of message, for the log */
    struct milter_result msg;   /* the message's verdict so far */
    char hdr[65536];            /* the header being collected */
    size_t hlen;
    bool in_hdr, hdr_over;
    bool eoh_sent;
    /* What the milters may still spend answering this message's headers
     * and body, all chunks together (ms): a milter answering each of a
     * thousand headers just within milter_content_timeout would hold
     * the session for days. */
    int64_t content_left_ms;
    int64_t eom_until;          /* io_clock_ms(): the chain's end of message */
    uint8_t body[MILTER_CHUNK];
    size_t blen;
    uint8_t *pkt;               /* MILTER_PACKET_MAX, allocated once */
};

/* Connects to every configured milter and negotiates; a milter that fails
 * is logged and counts as milter_default_action at the first stage. */
void milter_chain_open(struct milter_chain *c, const struct odmrd_conf *conf,
                       int client_fd);
bool milter_chain_active(const struct milter_chain *c);
/* The SMTP stages; each fills r (r->verdict MILTER_CONTINUE: go on). */
void milter_chain_connect(struct milter_chain *c, const struct milter_macros *m,
                          const char *client_name, struct milter_result *r);
void milter_chain_helo(struct milter_chain *c, const struct milter_macros *m,
                       struct milter_result *r);
void milter_chain_mail(struct milter_chain *c, const struct milter_macros *m,
                       const char *const *args, struct milter_result *r);
void milter_chain_rcpt(struct milter_chain *c, const struct milter_macros *m,
                       const char *const *args, struct milter_result *r);
void milter_chain_data(struct milter_chain *c, const struct milter_macros *m,
                       struct milter_result *r);
/* Message content as it arrives (CRLF lines, dot-stuffing undone), in
 * pieces of at most one line; line_start: piece begins a line. */
void milter_chain_header_piece(struct milter_chain *c, const char *p,
                               size_t len, bool line_start);
void milter_chain_end_of_headers(struct milter_chain *c,
                                 const struct milter_macros *m);
void milter_chain_body(struct milter_chain *c, const char *p, size_t len);
/* End of message: the verdict, and in *e the changes to apply
 * (milter_edits_free afterwards).  tmp_dir holds a replacement body. */
void milter_chain_end_of_message(struct milter_chain *c,
                                 const struct milter_macros *m,
                                 const char *tmp_dir, struct milter_edits *e,
                                 struct milter_result *r);
/* The transaction ended without a message (RSET, lost connection, a
 * refusal): milters forget it. */
void milter_chain_abort(struct milter_chain *c);
void milter_chain_close(struct milter_chain *c);
void milter_edits_free(struct milter_edits *e);
/* Applies a sender a milter set (logged with queue_id) to *mail: the
 * address, and those of BODY, SMTPUTF8, RET and ENVID it gave; the rest of
 * *mail stays as the client sent it. */
void milter_edits_apply_sender(const struct milter_edits *e,
                               const char *queue_id, struct mail_args *mail);

/* ------------------------------------------------------------ rewriting
 * (milter_edit.c).  The queue file is written as the message arrives; the
 * changes milters ask for at its end are applied by copying it. */

/* Where one header of the original lies in its file (folded lines
 * included, final CRLF included). */
struct milter_span {
    uint64_t off, len;
};
#define MILTER_HEADERS_MAX 10000   /* headers odmrd can change by index */

struct milter_original {
    int fd;                         /* the data, readable */
    uint64_t prefix;                /* odmrd's own Received:, kept on top */
    const struct milter_span *hdrs; /* the client's headers, in order */
    size_t nhdrs;
    uint64_t body_off;              /* the empty line before the body, or
                                       the end when there is none */
    uint64_t size;
};

/* Writes the original with e applied through out(ctx, data, len): the
 * header changes in order (index and name as libmilter defines them,
 * counted over the client's headers only), then the body, replaced when
 * e->body_fd >= 0.  Returns false + reason on a read error. */
bool milter_rewrite(const struct milter_original *o, const struct milter_edits *e,
                    void (*out)(void *ctx, const void *data, size_t len),
                    void *ctx, char *err, size_t n);

#endif
