"""A Message Batch with the official Python SDK against `make serve` (README, "Batches")."""

import time

import anthropic

client = anthropic.Anthropic(base_url="http://127.0.0.1:8787/proxy/local/anthropic", api_key="any-key")
questions = ["Is a tomato a fruit?", "Is the sea salty?", "Do fish fly?"]
batch = client.messages.batches.create(
    requests=[
        {
            "custom_id": f"q-{i}",
            "params": {
                "model": "gemma3:270m",
                "max_tokens": 32,
                "system": "Answer yes or no, then one short sentence.",
                "messages": [{"role": "user", "content": question}],
            },
        }
        for i, question in enumerate(questions)
    ]
)
while client.messages.batches.retrieve(batch.id).processing_status != "ended":
    time.sleep(1)
for entry in client.messages.batches.results(batch.id):
    if entry.result.type == "succeeded":
        print(entry.custom_id, entry.result.message.content[0].text)
    else:
        print(entry.custom_id, entry.result.type)
