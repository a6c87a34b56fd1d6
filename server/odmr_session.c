/* odmr_session.c - the ODMR service (RFC 2645) on odmr_listen.
 *
 * Not built yet: AUTH, ATRN and the reversed delivery are the next piece
 * of work (issue 3).  Until then the listener answers honestly with a
 * temporary refusal, so a customer's client retries later instead of
 * treating the provider as broken for good. */
#include "session.h"

#include "../common/io.h"
#include "../common/log.h"

void odmr_session_run(const struct odmrd_conf *conf, SSL_CTX *tls,
                      const struct session_peer *peer)
{
    struct io io;
    (void)tls;
    io_init(&io, peer->fd, (int)(conf->timeout * 1000));
    log_info("connect from %s (ODMR): service not available in this version",
             peer->addr);
    io_printf(&io, "421 4.3.2 %s ODMR service not available yet\r\n",
              conf->hostname);
    io_flush(&io);
    io_close(&io);
}
