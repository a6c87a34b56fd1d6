/* connect.h - outgoing connections with a timeout. */
#ifndef ODMR_CONNECT_H
#define ODMR_CONNECT_H

#include <stddef.h>

/* Connects to host:port (every address getaddrinfo gives, in order) or,
 * when host starts with '/', to that unix socket; waits at most
 * timeout_s for each attempt.  Returns a close-on-exec, non-blocking
 * socket, or -1 with a one-line reason in err. */
int net_connect(const char *host, unsigned port, long timeout_s, char *err,
                size_t n);

#endif
