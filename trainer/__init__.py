"""The streaming trainer: Embedding Variables, models from the schema, micro-batches from Kafka."""
