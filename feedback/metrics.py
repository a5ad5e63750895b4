"""Prometheus metrics of the feedback log (exported by whichever process runs the relay or the consumer)."""

from prometheus_client import Counter, Gauge

OUTBOX_DEPTH = Gauge("liveloop_outbox_depth", "Outbox rows waiting to be acknowledged by Kafka (parked ones not).")
OUTBOX_PARKED = Gauge("liveloop_outbox_parked_rows", "Outbox rows Kafka kept refusing: kept with their error, unsent.")
PUBLISHED = Counter("liveloop_outbox_published", "Outbox messages acknowledged by Kafka.")
PUBLISH_ERRORS = Counter("liveloop_outbox_publish_errors",
                         "Outbox messages Kafka did not acknowledge (retried until parked).")
CONSUMED = Counter("liveloop_feedback_consumed", "Feedback events handed to the caller in batches.")
DUPLICATES = Counter("liveloop_feedback_duplicates", "Feedback events dropped as repeats of an event id.")
SUPERSEDED = Counter("liveloop_feedback_superseded", "Ratings dropped because a later one in the batch replaced them.")
DEAD_LETTERED = Counter("liveloop_feedback_dead_lettered", "Messages sent to the dead-letter topic.", ["reason"])
CONSUMER_LAG = Gauge("liveloop_feedback_consumer_lag", "Messages of a feedback partition this consumer has not read "
                     "yet (high watermark − position), by partition.", ["partition"])
