// A text turn and a spoken turn through the `openai` npm package's OpenAIRealtimeWS,
// against a Duplex server. Prints every server event as one JSON line; exits non-zero
// on a failure. Usage: node realtime_turns.mjs BASE_URL TOKEN SPEECH_PCM24_FILE
import { readFileSync } from 'node:fs';
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const [baseURL, apiKey, speechFile] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey });
// The client always connects with wss: the test server has a self-signed certificate.
const rt = new OpenAIRealtimeWS({ model: 'duplex-echo', options: { rejectUnauthorized: false } }, client);

const waiters = [];
rt.on('event', (event) => {
  console.log(JSON.stringify(event));
  for (const w of [...waiters]) {
    if (w.type === event.type) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve(event);
    }
  }
});
rt.on('error', (err) => {
  console.log(JSON.stringify({ type: 'client.error', message: String(err.message || err) }));
});
const next = (type) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${type}`)), 30000);
    waiters.push({ type, resolve: (event) => (clearTimeout(timer), resolve(event)) });
  });

const opened = new Promise((resolve, reject) => {
  rt.socket.on('open', resolve);
  rt.socket.on('error', reject);
});
const created = next('session.created');
await opened;
await created;

// Text turn.
rt.send({
  type: 'conversation.item.create',
  item: { type: 'message', role: 'user', content: [{ type: 'input_text', text: 'Hello from Node' }] },
});
let done = next('response.done');
rt.send({ type: 'response.create' });
await done;

// Spoken turn, server_vad: speech then silence, in 40 ms appends.
const speech = readFileSync(speechFile);
const silence = Buffer.alloc(24 * 2 * 1200);
const audio = Buffer.concat([Buffer.alloc(24 * 2 * 300), speech, silence]);
done = next('response.done');
for (let i = 0; i < audio.length; i += 24 * 2 * 40) {
  rt.send({ type: 'input_audio_buffer.append', audio: audio.subarray(i, i + 24 * 2 * 40).toString('base64') });
}
await done;
// No process.exit(): it can cut stdout short when it is a pipe.
rt.close();
