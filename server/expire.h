/* expire.h - returning mail that stayed queued longer than queue_lifetime
 * (SPEC 3.1, 3.6).  Called by odmrd's maintenance child. */
#ifndef ODMR_EXPIRE_H
#define ODMR_EXPIRE_H

#include "conf.h"
#include "queue.h"

/* For every domain of the queue whose dequeue lock is free (a domain that
 * is being delivered right now is skipped until the next run): every
 * message that arrived more than conf->queue_lifetime seconds ago is
 * returned to its sender for all its remaining recipients (status 4.4.7)
 * and removed.  Each message is logged.  A message whose bounce could not
 * be queued (BOUNCE_RETRY) stays for the next run.  Bounded by the number
 * of queued messages; only expired ones are read beyond their name. */
void queue_expire(const struct odmrd_conf *conf, struct queue *q);

#endif
