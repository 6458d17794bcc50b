// Drives a running `ballast serve` with OpenAI's own client (the `openai` npm package, pinned in
// package.json): completions and chat, streamed and not, usage, finish_reason, stop strings,
// logprobs, the model list and an error. The expected texts come from `ballast generate` (the
// same greedy decoding without a server), passed by serve_checks.py as JSON:
//   node openai_client.mjs BASE_URL '{"model", "prompt", "text", "prompt_tokens", "max_tokens",
//                                    "chat_prompt", "chat_text", "chat_prompt_tokens"}'
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseURL, refJson] = process.argv.slice(2);
const ref = JSON.parse(refJson);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
let passed = 0, failed = 0;

async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAILED ${name}: ${e.stack || e}`);
  }
}

const greedy = { model: ref.model, temperature: 0, max_tokens: ref.max_tokens };
const chatMessages = [{ role: "user", content: ref.chat_prompt }];
const noThinking = { chat_template_kwargs: { enable_thinking: false } };

await check("models.list names the served model", async () => {
  const models = await client.models.list();
  assert.deepEqual(models.data.map((m) => m.id), [ref.model]);
});

await check("completions: greedy text, usage and finish_reason length", async () => {
  const r = await client.completions.create({ ...greedy, prompt: ref.prompt });
  assert.equal(r.object, "text_completion");
  assert.equal(r.choices[0].text, ref.text);
  assert.equal(r.choices[0].finish_reason, "length");
  assert.deepEqual(r.usage, { prompt_tokens: ref.prompt_tokens, completion_tokens: ref.max_tokens,
                              total_tokens: ref.prompt_tokens + ref.max_tokens });
});

await check("completions: streamed chunks add up to the same text, usage last", async () => {
  const stream = await client.completions.create({ ...greedy, prompt: ref.prompt, stream: true,
                                                   stream_options: { include_usage: true } });
  let text = "", finish = null, usage = null, chunks = 0;
  for await (const c of stream) {
    chunks++;
    if (c.choices.length) {
      text += c.choices[0].text;
      if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
    }
    if (c.usage) usage = c.usage;
  }
  assert.ok(chunks > 2, `only ${chunks} chunks`);
  assert.equal(text, ref.text);
  assert.equal(finish, "length");
  assert.equal(usage.completion_tokens, ref.max_tokens);
  assert.equal(usage.prompt_tokens, ref.prompt_tokens);
});

await check("completions: a stop string ends the text before it, finish_reason stop", async () => {
  const stop = ref.text.slice(6, 9);
  const r = await client.completions.create({ ...greedy, prompt: ref.prompt, stop: [stop] });
  assert.equal(r.choices[0].finish_reason, "stop");
  assert.equal(r.choices[0].text, ref.text.slice(0, ref.text.indexOf(stop)));
  assert.ok(r.usage.completion_tokens < ref.max_tokens);
});

await check("chat: the template's prompt, greedy content, usage", async () => {
  const r = await client.chat.completions.create({ ...greedy, messages: chatMessages, ...noThinking });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.choices[0].message.role, "assistant");
  assert.equal(r.choices[0].message.content, ref.chat_text);
  assert.ok(["stop", "length"].includes(r.choices[0].finish_reason));
  assert.equal(r.usage.prompt_tokens, ref.chat_prompt_tokens);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
});

await check("chat: streamed deltas add up to the same content", async () => {
  const stream = await client.chat.completions.create({ ...greedy, messages: chatMessages, ...noThinking,
                                                        stream: true, stream_options: { include_usage: true } });
  let content = "", role = null, finish = null, usage = null;
  for await (const c of stream) {
    if (c.choices.length) {
      const d = c.choices[0].delta;
      if (d.role) role = d.role;
      if (d.content) content += d.content;
      if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
    }
    if (c.usage) usage = c.usage;
  }
  assert.equal(role, "assistant");
  assert.equal(content, ref.chat_text);
  assert.ok(["stop", "length"].includes(finish));
  assert.equal(usage.prompt_tokens, ref.chat_prompt_tokens);
});

await check("chat: logprobs of greedy tokens are their top alternative's", async () => {
  const r = await client.chat.completions.create({ ...greedy, messages: chatMessages, ...noThinking,
                                                   logprobs: true, top_logprobs: 3 });
  const content = r.choices[0].logprobs.content;
  assert.equal(content.length, r.usage.completion_tokens);
  for (const t of content) {
    assert.ok(t.logprob <= 0);
    assert.equal(t.top_logprobs.length, 3);
    assert.equal(t.top_logprobs[0].token, t.token);
    assert.equal(t.top_logprobs[0].logprob, t.logprob);
    assert.ok(t.top_logprobs[1].logprob <= t.top_logprobs[0].logprob);
  }
});

await check("an unknown model is a 404 with an error object", async () => {
  await assert.rejects(client.completions.create({ ...greedy, model: "no-such-model", prompt: "x" }), (e) => {
    assert.equal(e.status, 404);
    assert.match(e.message, /no-such-model/);
    return true;
  });
});

await check("max_tokens 0 is a 400 naming the field", async () => {
  await assert.rejects(client.completions.create({ ...greedy, prompt: "x", max_tokens: 0 }), (e) => {
    assert.equal(e.status, 400);
    assert.match(e.message, /max_tokens/);
    return true;
  });
});

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
