// The official TypeScript SDK against CaseDesk. Prints one JSON object of observations;
// tests/e2e/test_sdk_typescript.py runs it and asserts on them.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.env.CASEDESK_BASE_URL, apiKey: "any-non-empty-key", maxRetries: 0 });
const model = process.env.CASEDESK_MODEL;
const system = "You repeat the user's text exactly, nothing else.";
const messages = [{ role: "user", content: "The quick brown fox jumps over the lazy dog near the river bank." }];
const text = (m) => m.content.filter((b) => b.type === "text").map((b) => b.text).join("");

const plain = await client.messages.create({ model, max_tokens: 40, temperature: 0, system, messages });

const stream = client.messages.stream({ model, max_tokens: 40, temperature: 0, system, messages });
const deltas = [];
stream.on("text", (t) => deltas.push(t));
const streamed = await stream.finalMessage();

const words = text(plain).split(/\s+/).filter(Boolean);
const stop = " " + words[3];
const stopped = await client.messages.create({
  model, max_tokens: 40, temperature: 0, system, messages, stop_sequences: [stop],
});

const counted = await client.messages.countTokens({ model, system, messages });
const models = [];
for await (const m of client.models.list()) models.push(m.id);

let notFound = null;
try {
  await client.messages.create({ model: "no-such-tag", max_tokens: 5, messages });
} catch (err) {
  notFound = { status: err.status, type: err.error?.error?.type };
}

// Message Batches (issue 18): create, wait until ended, read the results.
const batch = await client.messages.batches.create({
  requests: ["a", "b", "c"].map((id) => ({
    custom_id: `ts-${id}`,
    params: { model, max_tokens: 8, messages: [{ role: "user", content: `Say ${id}.` }] },
  })),
});
let ended = batch;
for (let i = 0; i < 2400 && ended.processing_status !== "ended"; i++) {
  await new Promise((resolve) => setTimeout(resolve, 100));
  ended = await client.messages.batches.retrieve(batch.id);
}
const results = [];
for await (const entry of await client.messages.batches.results(batch.id)) {
  results.push({ custom_id: entry.custom_id, type: entry.result.type, text: entry.result.message ? text(entry.result.message) : null });
}

console.log(JSON.stringify({
  plain: { id: plain.id, model: plain.model, text: text(plain), stop_reason: plain.stop_reason, usage: plain.usage },
  streamed: { text: text(streamed), deltas: deltas.length, stop_reason: streamed.stop_reason, usage: streamed.usage },
  stopped: { text: text(stopped), stop_reason: stopped.stop_reason, stop_sequence: stopped.stop_sequence, stop },
  counted: counted.input_tokens,
  models,
  notFound,
  batch: { id: batch.id, status: ended.processing_status, counts: ended.request_counts, results },
}));
