// Duplex browser demo: one duplex session (docs/protocol.md) with microphone, camera,
// text input, a live event log and gapless playback of reply audio.
//
// Plain ES module, standard APIs only (WebSocket, getUserMedia, AudioWorklet,
// canvas.toBlob), so it runs as served in Chromium and Firefox.

const INPUT_RATES = [8000, 16000, 24000, 32000, 44100, 48000]; // what the server accepts
const OUTPUT_RATE = 24000;
const CHUNK_MS = 20;
const REPORT_EVERY_MS = 250;
const PLAYBACK_LEAD_S = 0.05; // headroom before a buffer starts, so network jitter is no gap
const MAX_LOG_ENTRIES = 500;
const OLD_TOKEN_KEY = "duplex.token"; // where earlier versions kept the API token
const CLIENT_TOKEN_TTL_S = 600; // each connection gets a fresh client token of 10 minutes
const CLIENT_TOKEN_PREFIX = "ek_";
const AUDIO_UPDATE_ID = "demo-audio"; // the client id of the session.update declaring audio
// Reconnect after a dropped socket (docs/protocol.md "Resuming a session"): backoff from
// 100 ms doubling to 2 s, each wait 50-100 % of the step, giving up after 30 s.
const RETRY_FIRST_MS = 100;
const RETRY_MAX_MS = 2000;
const RETRY_GIVE_UP_MS = 30000;
const FINAL_CLOSE_CODES = [1000, 1008, 1011, 4001]; // the session is over: no reconnect
// The last messages sent are held so that a resume sends again those the drop lost
// (`session.resumed` `input_received`, docs/protocol.md "Resending input").
const RESEND_MAX_MESSAGES = 1000;
const RESEND_MAX_BYTES = 1024 * 1024;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  turnState: $("turn-state"),
  sessionId: $("session-id"),
  connectForm: $("connect-form"),
  token: $("token"),
  connect: $("connect"),
  mic: $("mic"),
  micLevel: $("mic-level"),
  speaking: $("speaking"),
  camera: $("camera"),
  frames: $("frames"),
  cameraView: $("camera-view"),
  canvas: $("frame-canvas"),
  playback: $("playback"),
  log: $("log"),
  textForm: $("text-form"),
  textInput: $("text-input"),
  send: $("send"),
};

let ws = null;
let audioCtx = null; // one AudioContext for capture and playback
let workletLoaded = null; // promise: the capture worklet module is registered
let mic = null; // {stream, source, node, sink}
let camera = null; // {stream, timer, frameNum, lastSentAt}
let speaking = false;
let audioDeclared = false; // session.update sent: binary frames now have a known format
let videoPolicy = { fps_speaking: 1, fps_idle: 0.2, max_dimension: 1024 };
let textCount = 0;
let turnsWaiting = 0; // turns ended whose response has not started yet
let attempt = 0; // connection attempts: a Disconnect during one makes it moot
let sessionId = null; // the session to resume after a drop
let lastSeq = 0; // the last numbered message handled: a resume replays what follows
let retry = null; // {step, deadline, timer} while reconnecting
let resuming = false; // a resume's socket is open but `session.resumed` has not come yet
let sentCount = 0; // messages sent on this session, counted as the server counts them
let unconfirmed = []; // [number, data, size] of the last messages sent, for a resume
let unconfirmedSize = 0;
const replies = new Map(); // response_id -> the reply's log entry

// ---- the log -----------------------------------------------------------------------

function clock(date) {
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}` +
    `.${pad(date.getMilliseconds(), 3)}`;
}

function addEntry(kind, label, text, attrs = {}) {
  const li = document.createElement("li");
  li.className = `entry ${kind}`;
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) li.setAttribute(name, String(value));
  }
  const now = new Date();
  const time = document.createElement("time");
  time.dateTime = now.toISOString();
  time.textContent = clock(now);
  const tag = document.createElement("span");
  tag.className = "label";
  tag.textContent = label;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(time, tag, body);

  // Follow new entries only if the reader is already at the bottom.
  const log = ui.log;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  log.append(li);
  while (log.childElementCount > MAX_LOG_ENTRIES) {
    const oldest = log.firstElementChild;
    if (oldest.classList.contains("reply")) replies.delete(oldest.dataset.responseId);
    oldest.remove();
  }
  if (atBottom) log.scrollTop = log.scrollHeight;
  return li;
}

const ms = (value) => `${Math.round(value)} ms`;

function logEvent(msg, text) {
  return addEntry("event", msg.type, text, { "data-type": msg.type, "data-seq": msg.seq });
}

function logError(code, message) {
  return addEntry("error", `error ${code}`, message, { "data-code": code });
}

// ---- connection --------------------------------------------------------------------

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text ?? state;
  const live = state === "connecting" || state === "connected" || state === "reconnecting";
  ui.connect.textContent = live ? "Disconnect" : "Connect";
  ui.token.disabled = live;
  const ready = state === "connected";
  for (const el of [ui.mic, ui.camera, ui.textInput, ui.send]) el.disabled = !ready;
}

// The turn, as the badge shows it: idle, listening, user-speaking, thinking, answering.
const TURN_LABELS = {
  idle: "idle",
  listening: "listening",
  "user-speaking": "you are speaking",
  thinking: "thinking",
  answering: "answering",
};

function setTurnState(state) {
  ui.turnState.dataset.state = state;
  ui.turnState.textContent = TURN_LABELS[state];
}

function settleTurnState() {
  if (speaking) setTurnState("user-speaking");
  else setTurnState(turnsWaiting > 0 ? "thinking" : "listening");
}

function wsOpen() {
  return ws !== null && ws.readyState === WebSocket.OPEN;
}

function send(message) {
  if (!wsOpen() || resuming) return false;
  sendData(JSON.stringify(message));
  return true;
}

// Every message to the server goes through here: numbered and held for a resume.
function sendData(data) {
  ws.send(data);
  sentCount += 1;
  const size = typeof data === "string" ? data.length : data.byteLength;
  unconfirmed.push([sentCount, data, size]);
  unconfirmedSize += size;
  while (unconfirmed.length > RESEND_MAX_MESSAGES || unconfirmedSize > RESEND_MAX_BYTES) {
    unconfirmedSize -= unconfirmed.shift()[2];
  }
}

// After `session.resumed`: send again what the server did not receive, before anything
// new; if it is no longer held (or the server cannot tell), say so and number on.
function resendAfter(received) {
  const heldFrom = unconfirmed.length ? unconfirmed[0][0] : sentCount + 1;
  if (received !== undefined && received + 1 >= heldFrom) {
    const again = unconfirmed.filter(([n]) => n > received);
    for (const [, data] of again) ws.send(data);
    if (again.length) addEntry("note", "input", `resent ${again.length} message(s) the drop lost`);
    sentCount = Math.max(sentCount, received);
    return;
  }
  if (received === undefined && sentCount > 0) {
    addEntry("note", "input", "the server restarted: input sent just before the drop may be lost");
  } else if (received !== undefined) {
    addEntry("note", "input", `${sentCount - received} message(s) lost in the drop: not resent`);
  }
  sentCount = received ?? 0;
  unconfirmed = [];
  unconfirmedSize = 0;
}

// Created inside the Connect click, so autoplay policies let it run.
function getAudioContext() {
  if (audioCtx && audioCtx.state !== "closed") return audioCtx;
  audioCtx = new AudioContext();
  // Capture at the context's own rate when the server accepts it (Firefox cannot connect
  // a microphone to a context of another rate); otherwise ask for 48 kHz.
  if (!INPUT_RATES.includes(audioCtx.sampleRate)) {
    audioCtx.close();
    audioCtx = new AudioContext({ sampleRate: 48000 });
  }
  workletLoaded = null;
  return audioCtx;
}

// A short-lived client token for one connection. The API token typed into the page is
// only sent to POST /v1/client_tokens (never in a URL, never stored); a client token
// pasted as is (ek_...) is used directly.
async function clientToken() {
  const token = ui.token.value.trim();
  if (!token || token.startsWith(CLIENT_TOKEN_PREFIX)) return token;
  const reply = await fetch(new URL("/v1/client_tokens", location.href), {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ ttl_s: CLIENT_TOKEN_TTL_S }),
  });
  if (!reply.ok) {
    let detail = "";
    try {
      detail = (await reply.json()).detail ?? "";
    } catch {}
    throw Object.assign(new Error(`the server refused the API token: ${detail}`), {
      code: reply.status,
    });
  }
  return (await reply.json()).token;
}

// Every connection, a resume included, gets a fresh client token first.
async function connect(resume = false) {
  getAudioContext().resume(); // inside the click, before any await: autoplay policies
  if (!resume) setStatus("connecting");
  const mine = ++attempt;
  let token;
  try {
    token = await clientToken();
  } catch (err) {
    if (mine !== attempt) return; // disconnected meanwhile
    // The server unreachable while resuming: that attempt failed, try the next one.
    if (resume && err.code === undefined && scheduleResume()) return;
    retry = null;
    logError(err.code ?? "-", err.message);
    setStatus("closed", `not connected (${err.code ?? "network error"})`);
    teardown();
    return;
  }
  if (mine !== attempt) return;

  const url = new URL("/v1/duplex", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  if (resume) {
    url.searchParams.set("session_id", sessionId);
    url.searchParams.set("last_seq", String(lastSeq));
  } else {
    sessionId = null;
    lastSeq = 0;
    sentCount = 0;
    unconfirmed = [];
    unconfirmedSize = 0;
  }
  resuming = resume;
  const sock = new WebSocket(url);
  sock.binaryType = "arraybuffer";
  ws = sock;
  audioDeclared = false;
  if (!resume) setStatus("connecting");

  // Handlers check `ws === sock` so a late event of an old socket changes nothing.
  sock.onmessage = (event) => {
    if (ws !== sock || typeof event.data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      logError("-", `unreadable message from the server: ${event.data.slice(0, 200)}`);
      return;
    }
    if (msg.seq) {
      if (msg.seq <= lastSeq) return; // handled before the drop: never twice
      lastSeq = msg.seq;
    }
    onServerMessage(msg);
  };
  sock.onerror = () => {
    if (ws === sock) addEntry("note", "socket", "connection error");
  };
  sock.onclose = (event) => {
    if (ws !== sock) return;
    ws = null;
    if (sessionId && !FINAL_CLOSE_CODES.includes(event.code) && scheduleResume()) {
      addEntry("note", "socket", `connection lost (${event.code}): resuming`);
      return; // microphone, camera and playback go on; they send once reconnected
    }
    retry = null;
    const reason = event.reason ? `: ${event.reason}` : "";
    setStatus("closed", `closed (${event.code}${reason})`);
    ui.status.dataset.code = event.code;
    teardown();
  };
}

// The next reconnect attempt, or false once the time allowed is over.
function scheduleResume() {
  const now = Date.now();
  if (retry === null) retry = { step: RETRY_FIRST_MS, deadline: now + RETRY_GIVE_UP_MS };
  if (now >= retry.deadline) return false;
  const wait = retry.step * (0.5 + Math.random() / 2);
  retry.step = Math.min(retry.step * 2, RETRY_MAX_MS);
  retry.timer = setTimeout(() => {
    retry.timer = null;
    connect(true);
  }, wait);
  setStatus("reconnecting", "reconnecting…");
  return true;
}

function disconnect() {
  attempt++;
  if (retry?.timer) clearTimeout(retry.timer);
  retry = null;
  if (ws) ws.close(1000, "bye");
  else {
    setStatus("closed", "closed (1000)");
    teardown();
  }
}

function teardown() {
  stopMic();
  stopCamera();
  player.stop();
  setSpeaking(false);
  turnsWaiting = 0;
  setTurnState("idle");
}

// ---- server messages ---------------------------------------------------------------

function onServerMessage(msg) {
  switch (msg.type) {
    case "session.created":
      sessionId = msg.session.id;
      showSession(msg.session);
      declareAudio();
      setStatus("connected");
      setTurnState("listening");
      logEvent(msg, `session ${msg.session.id} (${msg.session.mode}, ${msg.session.provider})`);
      break;
    case "session.updated":
      showSession(msg.session);
      logEvent(msg, "settings applied");
      break;
    case "session.resumed":
      retry = null;
      resuming = false;
      resendAfter(msg.input_received);
      showSession(msg.session);
      audioDeclared = true; // the session kept the capture format declared before
      setStatus("connected");
      settleTurnState();
      logEvent(msg, `resumed after #${msg.last_seq}: replay from #${msg.first_seq}`);
      break;
    case "speech.started":
      setSpeaking(true);
      setTurnState("user-speaking");
      logEvent(msg, `at ${ms(msg.audio_start_ms)}`);
      break;
    case "speech.stopped":
      setSpeaking(false);
      setTurnState("thinking");
      logEvent(msg, `at ${ms(msg.audio_end_ms)}`);
      break;
    case "turn.ended": {
      const span = msg.audio_start_ms !== undefined
        ? `${ms(msg.audio_start_ms)} – ${ms(msg.audio_end_ms)}`
        : "text turn";
      turnsWaiting++;
      setTurnState("thinking");
      logEvent(msg, span).setAttribute("data-turn-id", msg.turn_id);
      break;
    }
    case "transcript":
      showTranscript(msg);
      break;
    case "response.started":
      turnsWaiting = Math.max(0, turnsWaiting - 1);
      replyEntry(msg.response_id, msg.request_id);
      if (!speaking) setTurnState("answering");
      break;
    case "chunk":
      onChunk(msg);
      break;
    case "response.done": {
      const entry = replyEntry(msg.response_id);
      entry.dataset.state = "done";
      entry.dataset.finishReason = msg.finish_reason;
      player.finish(msg.response_id);
      settleTurnState();
      break;
    }
    case "error":
      logError(msg.code, msg.message + (msg.fatal ? " (fatal)" : ""));
      // Refused capture format: binary frames would be misread, so stop sending them.
      if (msg.id === AUDIO_UPDATE_ID) audioDeclared = false;
      break;
    case "tool.execution":
      addEntry("note", "tools running", `${msg.calls.join(", ")} (round ${msg.hop})`, {
        "data-type": msg.type,
        "data-response-id": msg.response_id,
      });
      break;
    case "tool.output":
      addEntry("note", "tool output", `${msg.name}: ${msg.output}`, {
        "data-type": msg.type,
        "data-call-id": msg.call_id,
      });
      break;
    case "tool.cancelled":
      addEntry("note", "tools cancelled", msg.call_ids.join(", "), { "data-type": msg.type });
      break;
    case "warning":
      addEntry("note", "warning", `${msg.code}: ${msg.message}`, { "data-type": msg.type });
      break;
    case "provider.reconnect":
      addEntry(
        "note",
        "provider",
        `connection lost and reopened (${msg.reason}); ` +
          (msg.context_kept ? "context kept" : "the model starts afresh"),
        { "data-type": msg.type },
      );
      break;
    case "pong":
      break;
    default:
      addEntry("note", msg.type, JSON.stringify(msg));
  }
}

function showSession(session) {
  ui.sessionId.textContent = session.id;
  videoPolicy = { ...videoPolicy, ...(session.config?.video ?? {}) };
}

// Binary frames are only meaningful once the server knows their rate: declare it first.
function declareAudio() {
  const ctx = getAudioContext();
  audioDeclared = send({
    type: "session.update",
    id: AUDIO_UPDATE_ID,
    config: {
      input_audio: { format: "pcm16", sample_rate: ctx.sampleRate, channels: 1 },
      output_audio: { sample_rate: OUTPUT_RATE },
    },
  });
}

function showTranscript(msg) {
  // Partial transcripts of one turn update a single entry.
  const selector = msg.turn_id ? `.transcript[data-turn-id="${CSS.escape(msg.turn_id)}"]` : null;
  let entry = selector ? ui.log.querySelector(selector) : null;
  if (!entry) entry = addEntry("transcript", "you (heard)", "", { "data-turn-id": msg.turn_id });
  entry.querySelector(".text").textContent = msg.text;
  entry.dataset.final = String(msg.final !== false);
}

function replyEntry(responseId, requestId) {
  let entry = replies.get(responseId);
  if (!entry || !entry.isConnected) {
    entry = addEntry("reply", "reply", "", {
      "data-response-id": responseId,
      "data-request-id": requestId,
      "data-state": "streaming",
    });
    replies.set(responseId, entry);
  }
  return entry;
}

function onChunk(chunk) {
  const id = chunk.response_id;
  if (chunk.delta) replyEntry(id).querySelector(".text").textContent += chunk.delta;
  if (chunk.media && chunk.media.mime_type === "audio/pcm") {
    player.enqueue(id, chunk.media.data, chunk.media.sample_rate ?? OUTPUT_RATE,
      chunk.media.channels ?? 1);
  }
  if (chunk.tool_calls) {
    for (const call of chunk.tool_calls) {
      addEntry("note", "tool call", `${call.name}(${call.arguments})`, { "data-call-id": call.id });
    }
  }
  if (chunk.interrupted) {
    player.stop(); // the user talked over the reply: silence it now, not after the queue
    const entry = replyEntry(id);
    entry.dataset.interrupted = "true";
    addEntry("event", "interrupted", `reply ${id} cut off`, {
      "data-type": "chunk.interrupted",
      "data-response-id": id,
    });
  }
}

// ---- reply playback ----------------------------------------------------------------

function base64ToBytes(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

// Schedules each PCM chunk right after the previous one on the AudioContext clock
// (gapless), and tells the server how much of each response the user has heard.
class Player {
  constructor() {
    this.playhead = 0; // context time at which the next chunk starts
    this.sources = new Set();
    this.responses = new Map(); // response_id -> {segments: [{start, duration}], sent, done}
    this.cutOff = new Set(); // interrupted responses: late audio for them is dropped
    this.timer = null;
    this.latest = null; // {id, played} of the last report, for the display
  }

  enqueue(responseId, b64, rate, channels) {
    if (this.cutOff.has(responseId) || !audioCtx) return;
    const ctx = audioCtx;
    const bytes = base64ToBytes(b64);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const frames = Math.floor(bytes.byteLength / 2 / channels);
    if (frames === 0) return;
    const buffer = ctx.createBuffer(channels, frames, rate);
    for (let c = 0; c < channels; c++) {
      const out = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) out[i] = view.getInt16((i * channels + c) * 2, true) / 32768;
    }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const start = Math.max(this.playhead, ctx.currentTime + PLAYBACK_LEAD_S);
    source.start(start);
    this.playhead = start + buffer.duration;
    source.onended = () => {
      this.sources.delete(source);
      if (this.sources.size === 0) this.report(true);
    };
    this.sources.add(source);

    let response = this.responses.get(responseId);
    if (!response) {
      response = { segments: [], sent: -1, done: false };
      this.responses.set(responseId, response);
    }
    response.segments.push({ start, duration: buffer.duration });
    if (this.timer === null) this.timer = setInterval(() => this.report(false), REPORT_EVERY_MS);
  }

  // The server sent all of this response; forget it once it has been played and reported.
  finish(responseId) {
    const response = this.responses.get(responseId);
    if (response) response.done = true;
    if (this.sources.size === 0) this.report(true);
  }

  playedMs(response, now) {
    let played = 0;
    for (const { start, duration } of response.segments) {
      played += Math.min(Math.max(now - start, 0), duration);
    }
    return Math.round(played * 1000);
  }

  // Send `playback` for every response whose heard amount changed; `idle` means nothing
  // is scheduled any more, so this is the final report of what was heard.
  report(idle) {
    const now = audioCtx ? audioCtx.currentTime : 0;
    let latest = null;
    for (const [id, response] of this.responses) {
      const played = this.playedMs(response, now);
      if (played !== response.sent && played > 0) {
        send({ type: "playback", response_id: id, played_ms: played });
        response.sent = played;
      }
      latest = { id, played };
      if (idle && response.done) this.responses.delete(id);
    }
    if (idle) {
      clearInterval(this.timer);
      this.timer = null;
    }
    this.show(idle ? "idle" : "playing", latest);
  }

  // Stop everything scheduled at once (interruption, disconnect) and report what was heard.
  stop() {
    const now = audioCtx ? audioCtx.currentTime : 0;
    for (const source of this.sources) {
      source.onended = null;
      source.stop(); // also cancels buffers scheduled to start later
    }
    const hadAudio = this.sources.size > 0;
    this.sources.clear();
    // Cut every segment at `now`, so the final report is what was actually heard.
    for (const [id, response] of this.responses) {
      for (const seg of response.segments) {
        seg.duration = Math.min(Math.max(now - seg.start, 0), seg.duration);
      }
      this.cutOff.add(id);
      response.done = true;
    }
    this.playhead = 0;
    this.report(true);
    if (hadAudio) this.show("stopped");
  }

  show(state, latest) {
    if (latest) this.latest = latest;
    latest = this.latest;
    ui.playback.dataset.state = state;
    if (latest) {
      ui.playback.dataset.responseId = latest.id;
      ui.playback.dataset.playedMs = String(latest.played);
    }
    const played = latest ? ` · ${(latest.played / 1000).toFixed(2)} s of the last reply heard`
      : "";
    ui.playback.textContent = `playback ${state}${played}`;
  }
}

const player = new Player();

// ---- microphone --------------------------------------------------------------------

async function startMic() {
  const ctx = getAudioContext();
  await ctx.resume();
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  try {
    workletLoaded ??= ctx.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url));
    await workletLoaded;
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "pcm-capture", {
      processorOptions: { chunkMs: CHUNK_MS },
    });
    // A node is only rendered when it leads to the destination; a muted gain keeps the
    // microphone out of the speakers.
    const sink = ctx.createGain();
    sink.gain.value = 0;
    node.port.onmessage = ({ data }) => {
      ui.micLevel.value = Math.min(1, Math.max(0, (20 * Math.log10(data.rms + 1e-9) + 60) / 60));
      if (audioDeclared && wsOpen() && !resuming) sendData(data.pcm);
    };
    source.connect(node).connect(sink).connect(ctx.destination);
    mic = { stream, source, node, sink };
  } catch (err) {
    for (const track of stream.getTracks()) track.stop();
    throw err;
  }
  ui.mic.textContent = "Stop microphone";
  ui.mic.setAttribute("aria-pressed", "true");
  addEntry("note", "microphone", `on, ${ctx.sampleRate} Hz PCM16 in ${CHUNK_MS} ms frames`);
}

function stopMic() {
  if (!mic) return;
  mic.node.port.onmessage = null;
  mic.source.disconnect();
  mic.node.disconnect();
  mic.sink.disconnect();
  for (const track of mic.stream.getTracks()) track.stop();
  mic = null;
  ui.micLevel.value = 0;
  ui.mic.textContent = "Start microphone";
  ui.mic.setAttribute("aria-pressed", "false");
}

function setSpeaking(value) {
  if (speaking === value) return;
  speaking = value;
  ui.speaking.dataset.speaking = String(value);
  ui.speaking.textContent = value ? "speaking" : "silent";
  if (camera) scheduleFrame(); // the frame rate depends on whether the user speaks
}

// ---- camera ------------------------------------------------------------------------

async function startCamera() {
  const stream = await navigator.mediaDevices.getUserMedia({
    video: { width: { ideal: 640 }, height: { ideal: 480 } },
  });
  ui.cameraView.srcObject = stream;
  ui.cameraView.hidden = false;
  camera = { stream, timer: null, frameNum: 0, lastSentAt: -Infinity };
  ui.camera.textContent = "Stop camera";
  ui.camera.setAttribute("aria-pressed", "true");
  scheduleFrame();
}

function stopCamera() {
  if (!camera) return;
  clearTimeout(camera.timer);
  for (const track of camera.stream.getTracks()) track.stop();
  camera = null;
  ui.cameraView.srcObject = null;
  ui.cameraView.hidden = true;
  ui.camera.textContent = "Start camera";
  ui.camera.setAttribute("aria-pressed", "false");
}

// The server's policy: fps_speaking while the user speaks, fps_idle otherwise (0 = none).
function frameIntervalMs() {
  const fps = speaking ? videoPolicy.fps_speaking : videoPolicy.fps_idle;
  return fps > 0 ? 1000 / fps : null;
}

function scheduleFrame(retryMs) {
  if (!camera) return;
  clearTimeout(camera.timer);
  const interval = frameIntervalMs();
  if (retryMs === undefined && interval === null) return; // idle rate 0: wait for speech
  const delay = retryMs ?? Math.max(0, camera.lastSentAt + interval - performance.now());
  camera.timer = setTimeout(sendFrame, delay);
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function sendFrame() {
  const cam = camera;
  if (!cam) return;
  const { videoWidth: w, videoHeight: h } = ui.cameraView;
  if (!w || !h) return scheduleFrame(200); // no picture yet
  const scale = Math.min(1, videoPolicy.max_dimension / Math.max(w, h));
  const canvas = ui.canvas;
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h * scale);
  canvas.getContext("2d").drawImage(ui.cameraView, 0, 0, canvas.width, canvas.height);
  cam.lastSentAt = performance.now();
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.8));
  if (blob && camera === cam) {
    const sent = send({
      type: "input.image",
      data: await blobToBase64(blob),
      mime_type: "image/jpeg",
      width: canvas.width,
      height: canvas.height,
      frame_num: ++cam.frameNum,
      timestamp: Date.now() / 1000,
    });
    if (sent) {
      ui.frames.dataset.count = String(cam.frameNum);
      ui.frames.textContent = `${cam.frameNum} frame(s) sent`;
    }
  }
  if (camera === cam) scheduleFrame();
}

// ---- wiring ------------------------------------------------------------------------

function fail(what) {
  return (err) => logError("-", `${what}: ${err?.message ?? err}`);
}

ui.connectForm.addEventListener("submit", (event) => {
  event.preventDefault();
  if (ws || retry || ui.status.dataset.state === "connecting") disconnect();
  else connect();
});

ui.mic.addEventListener("click", () => {
  if (mic) stopMic();
  else startMic().catch(fail("microphone"));
});

ui.camera.addEventListener("click", () => {
  if (camera) stopCamera();
  else startCamera().catch(fail("camera"));
});

ui.textForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.textInput.value.trim();
  if (!text) return;
  const requestId = `text-${++textCount}`;
  if (send({ type: "input.text", text, final: true, request_id: requestId })) {
    addEntry("user", "you", text, { "data-request-id": requestId });
    ui.textInput.value = "";
    setTurnState("thinking");
  }
});

// A backend may hand this page a client token in the fragment (never sent to a server):
// /#client_token=ek_... ; it is taken out of the address bar at once.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.has("client_token")) {
  ui.token.value = fragment.get("client_token");
  history.replaceState(null, "", location.pathname + location.search);
}
localStorage.removeItem(OLD_TOKEN_KEY); // no token is kept in the browser any more
setStatus("idle", "not connected");
setTurnState("idle");
