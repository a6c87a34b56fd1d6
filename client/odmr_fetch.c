/* odmr_fetch.c - the customer-side client (SPEC 4).
 *
 * Only the command line frame exists so far; authentication, ATRN and
 * the reversed SMTP server are the client issue's work.  Until then the
 * program says so plainly and exits with EX_UNAVAILABLE (69) instead of
 * pretending to fetch anything. */
#include <stdio.h>
#include <string.h>

#include "../common/util.h"

#define EX_UNAVAILABLE_ 69

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help")) {
            printf("usage: odmr-fetch [-c FILE] [options] [DOMAIN...]\n"
                   "Fetches a site's queued mail from an ODMR provider "
                   "(RFC 2645).\nSee odmr-fetch(1).\n");
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("odmr-fetch %s\n", ODMR_VERSION);
            return 0;
        }
    }
    fprintf(stderr, "odmr-fetch: fetching is not implemented in this "
                    "version yet\n");
    return EX_UNAVAILABLE_;
}
