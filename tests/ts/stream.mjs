// The official TypeScript SDK streams one answer twice (messages.stream → finalMessage, and
// messages.create with stream: true); prints one JSON object of what it saw. Run by
// tests/test_keepalive.py against CaseDesk in front of a fake llama-server.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.env.CASEDESK_BASE_URL, apiKey: "k", maxRetries: 0 });
const request = { model: "m", max_tokens: 50, messages: [{ role: "user", content: "hi" }] };
const text = (m) => m.content.filter((b) => b.type === "text").map((b) => b.text).join("");

const [final, raw] = await Promise.all([
  client.messages.stream(request).finalMessage(),
  (async () => {
    const events = [];
    for await (const event of await client.messages.create({ ...request, stream: true })) events.push(event);
    return events;
  })(),
]);

console.log(JSON.stringify({
  stream: { text: text(final), stop_reason: final.stop_reason, usage: final.usage },
  create: {
    types: raw.map((e) => e.type),
    text: raw.filter((e) => e.type === "content_block_delta").map((e) => e.delta.text).join(""),
    usage: raw.find((e) => e.type === "message_delta").usage,
  },
}));
