// The page: one WebSocket to /v1/realtime/video, each binary message (one chunk as a self-contained
// fragmented MP4) appended to a MediaSource SourceBuffer in "sequence" mode, which plays the chunks back to
// back. Shows the first-chunk latency and the FPS the video element really decoded. A chunk is appended as
// soon as it arrives (chunk 0 too: its bytes may arrive while the SourceBuffer is still being opened).
"use strict";
const $ = (id) => document.getElementById(id);
const page = { ws: null, sourceBuffer: null, pending: [], chunks: 0, started: 0, ended: false,
               arrivals: [], appended: [] }; // ms since start: each chunk's metadata, each append's end
window.heliosPage = page; // read by the browser test

function log(text) { $("log").textContent += text + "\n"; }
function status(text) { $("status").textContent = text; page.status = text; }

function appendNext() {
  const sb = page.sourceBuffer;
  if (!sb || sb.updating || page.pending.length === 0) return;
  sb.appendBuffer(page.pending.shift());
}

function openMedia(mime) {
  return new Promise((resolve, reject) => {
    if (!window.MediaSource || !MediaSource.isTypeSupported(mime)) {
      reject(new Error("this browser cannot play " + mime + " through Media Source Extensions"));
      return;
    }
    const ms = new MediaSource();
    page.mediaSource = ms;
    $("video").src = URL.createObjectURL(ms);
    ms.addEventListener("sourceopen", () => {
      const sb = ms.addSourceBuffer(mime);
      sb.mode = "sequence"; // each chunk's piece starts at 0: play them one after the other
      sb.addEventListener("updateend", () => {
        page.appended.push(performance.now() - page.started);
        appendNext();
        if (page.ended && page.pending.length === 0 && !sb.updating && ms.readyState === "open") ms.endOfStream();
      });
      page.sourceBuffer = sb;
      resolve();
    }, { once: true });
  });
}

function showFps() {
  const v = $("video");
  const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
  if (q && v.currentTime > 0) $("fps").textContent = (q.totalVideoFrames / v.currentTime).toFixed(1);
  page.decodedFrames = q ? q.totalVideoFrames : 0;
}
setInterval(showFps, 250);
$("video").addEventListener("playing", () => { // ms since start when the video first plays
  if (page.playingAt == null) page.playingAt = performance.now() - page.started;
});

async function onMessage(ev) {
  if (typeof ev.data !== "string") {
    page.pending.push(new Uint8Array(await ev.data.arrayBuffer()));
    appendNext();
    return;
  }
  const msg = JSON.parse(ev.data);
  if (msg.type === "session.started") {
    page.streamId = msg.stream_id;
    status("streaming " + msg.width + "x" + msg.height);
    $("stop").disabled = false; $("change").disabled = false;
  } else if (msg.type === "video.chunk_metadata") {
    page.arrivals.push(performance.now() - page.started);
    if (!page.sourceBuffer) {
      await openMedia(msg.mime);
      appendNext(); // chunk 0's bytes came while the buffer opened: play them now, not when chunk 1 comes
    }
    page.chunks += 1;
    $("chunks").textContent = page.chunks;
    if (msg.chunk_index === 0) {
      page.firstChunkLatency = (performance.now() - page.started) / 1000;
      $("latency").textContent = page.firstChunkLatency.toFixed(2);
    }
  } else if (msg.type === "session.prompt_updated") {
    log("prompt changed from chunk " + msg.from_chunk);
  } else if (msg.type === "session.completed" || msg.type === "session.stopped") {
    page.ended = true;
    status(msg.type === "session.completed" ? "completed" : "stopped");
    $("stop").disabled = true; $("change").disabled = true;
    appendNext();
  } else if (msg.type === "session.warning") {
    log("warning: " + msg.message);
  } else if (msg.type === "error") {
    status("error");
    log("error: " + msg.error.message);
  }
}

function start() {
  if (page.ws) page.ws.close();
  Object.assign(page, { sourceBuffer: null, pending: [], chunks: 0, ended: false, firstChunkLatency: null,
                       arrivals: [], appended: [], playingAt: null });
  const key = $("key").value.trim();
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/realtime/video";
  const ws = new WebSocket(url, key ? ["helios.v1", "bearer." + key] : ["helios.v1"]);
  page.ws = ws;
  status("connecting");
  ws.onopen = () => {
    page.started = performance.now();
    ws.send(JSON.stringify({ type: "session.start", prompt: $("prompt").value,
                             num_frames: parseInt($("frames").value, 10) || 33 }));
  };
  ws.onmessage = (ev) => onMessage(ev).catch((e) => { status("error"); log(String(e)); });
  ws.onclose = (ev) => { if (!page.ended) status(ev.code === 1006 ? "refused (check the API key)" : "closed"); };
}

$("start").onclick = start;
$("stop").onclick = () => page.ws && page.ws.send(JSON.stringify({ type: "session.stop" }));
$("change").onclick = () => page.ws && page.ws.send(JSON.stringify({ type: "session.interaction",
                                                                     prompt: $("newprompt").value }));
