"""The feedback log: ratings from the API to the trainer, exactly once in effect.

- ``events``: the versioned event the trainer reads (everything it needs, no call back);
- ``service``: a rating and its outbox event in one transaction; ``FeedbackWriter`` commits them in groups;
- ``relay``: outbox → Kafka, marked sent only after the broker's ack; ``replay``: the database → Kafka again;
- ``consumer``: batches with manual commits, dedup, change-of-mind resolution and dead letters;
- ``kafka``: clients and topics from settings; ``broker``: the embedded Tansu broker for development and tests.
"""
