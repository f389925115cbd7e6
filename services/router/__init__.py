"""Router service: the OpenAI ingress that picks the least-busy replica and relays backpressure."""
