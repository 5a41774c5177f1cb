"""Message Batches (issue 18): a durable store, a pure scheduler and the runner between them."""
