"""The AMQP layer: topology as data, the publisher, and the consumer (the one place that acks)."""
