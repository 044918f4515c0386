"""Where CDRs go: the JSONL file here; durable spool, PostgreSQL and Kafka later."""
