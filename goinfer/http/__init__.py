"""The HTTP tier: checks signed requests, queues them, and answers in go-infer's envelope."""
