// The clipground web page: upload or pick an image, type phrases, see each phrase's box.
// Talks only to this server's own API (/v1/...); loads nothing from elsewhere.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
                 "#469990", "#800000", "#808000", "#000075"];
const $ = (id) => document.getElementById(id);

const state = {
  blob: null,        // the current image's bytes
  name: "",          // its file name
  url: null,         // object URL shown in the panels
  imageId: null,     // the server's id for it (sha256 of the bytes)
  encoded: new Set(),// methods whose heavy image state the server holds for it
  results: {},       // method id -> the server's answer
  encodeMs: {},      // method id -> ms the server spent encoding the image in this round (absent: cached)
  methods: [],
  auth: false,
};

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status" + (kind ? " " + kind : "");
  el.dataset.kind = kind || "";
  if (kind === "busy") document.body.dataset.busyCount = String(Number(document.body.dataset.busyCount || 0) + 1);
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

async function api(path, options) {
  const resp = await fetch(path, options);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.error ? body.error.message : `HTTP ${resp.status}`;
    const err = new Error(msg);
    err.status = resp.status;
    throw err;
  }
  return body;
}

async function checkHealth() {
  const el = $("health");
  try {
    const h = await api("/health");
    el.textContent = `${h.methods.length} method(s), ${h.cache.images} cached image(s)`;
    el.className = "health ok";
    if (h.auth && !state.auth) { state.auth = true; $("key-row").hidden = false; }
  } catch (e) {
    el.textContent = "server unreachable";
    el.className = "health bad";
  }
}

async function loadMethods() {
  const m = await api("/v1/methods", { headers: headers() });
  state.methods = m.methods;
  const a = $("method-a"), b = $("method-b");
  a.textContent = "";
  b.querySelectorAll("option[value]:not([value=''])").forEach((o) => o.remove());
  for (const item of m.methods) {
    const label = item.id + (item.default ? " (default)" : "");
    a.append(new Option(label, item.id, item.default, item.default));
    b.append(new Option(item.id, item.id));
  }
}

async function loadExamples() {
  const sel = $("examples");
  try {
    const ex = await api("/v1/examples", { headers: headers() });
    for (const e of ex.examples) {
      const o = new Option(`${e.title} (${e.kind})`, e.url);
      o.dataset.phrases = JSON.stringify(e.phrases || []);
      o.dataset.file = e.file;
      sel.append(o);
    }
  } catch (e) { /* examples are optional */ }
}

function useImage(blob, name) {
  if (state.url) URL.revokeObjectURL(state.url);
  state.blob = blob;
  state.name = name || "upload";
  state.url = URL.createObjectURL(blob);
  state.imageId = null;
  state.encoded = new Set();
  state.results = {};
  state.encodeMs = {};
  $("image-name").textContent = `${state.name} (${Math.round(blob.size / 1024)} KB)`;
  $("image-name").classList.remove("muted");
  $("download").disabled = true;
  $("json").textContent = "";
  renderPanels([]);
  setStatus("new image: the first phrase encodes it (a second or two), later phrases reuse it");
}

async function pickExample() {
  const o = $("examples").selectedOptions[0];
  if (!o || !o.value) return;
  const resp = await fetch(o.value);
  useImage(await resp.blob(), o.dataset.file);
  const phrases = JSON.parse(o.dataset.phrases || "[]");
  if (phrases.length) $("phrases").value = phrases.join("\n");
}

function phrasesTyped() {
  return $("phrases").value.split("\n").map((s) => s.trim()).filter((s) => s.length);
}

async function encodeImage(method) {
  const form = new FormData();
  form.append("image", state.blob, state.name);
  form.append("method", method);
  const r = await api("/v1/images", { method: "POST", body: form, headers: headers() });
  state.imageId = r.image_id;
  state.encoded.add(method);
  return r;
}

async function groundWith(method, phrases) {
  if (!state.encoded.has(method) || !state.imageId) {
    setStatus(`encoding the image for ${method}… (first phrase on a new image)`, "busy");
    const r = await encodeImage(method);
    state.encodeMs[method] = r.timing_ms.image;
  }
  const body = JSON.stringify({ phrases: phrases, method: method });
  const opts = () => ({ method: "POST", body: body, headers: headers({ "Content-Type": "application/json" }) });
  try {
    return await api(`/v1/images/${state.imageId}/ground`, opts());
  } catch (e) {
    if (e.status !== 404) throw e;
    state.encoded.clear();  // evicted from the server's cache: send it again
    setStatus(`re-encoding the image for ${method}… (it left the server's cache)`, "busy");
    await encodeImage(method);
    return await api(`/v1/images/${state.imageId}/ground`, opts());
  }
}

async function ground() {
  if (!state.blob) { setStatus("choose an image first", "error"); return; }
  const phrases = phrasesTyped();
  if (!phrases.length) { setStatus("type at least one phrase", "error"); return; }
  const methods = [$("method-a").value];
  const b = $("method-b").value;
  if (b && b !== methods[0]) methods.push(b);
  $("ground").disabled = true;
  const t0 = performance.now();
  try {
    const results = {};
    state.encodeMs = {};
    for (const m of methods) {
      if (state.encoded.has(m)) setStatus(`grounding with ${m} (cached image: text side only)…`, "busy");
      results[m] = await groundWith(m, phrases);
    }
    state.results = results;
    renderPanels(methods);
    const took = Math.round(performance.now() - t0);
    const cached = methods.every((m) => !(m in state.encodeMs));
    setStatus(`${phrases.length} phrase(s), ${methods.length} method(s) in ${took} ms` +
              (cached ? " (cached image)" : ""), "done");
    $("download").disabled = false;
  } catch (e) {
    setStatus(e.message, "error");
  } finally {
    $("ground").disabled = false;
    checkHealth();
  }
}

function pct(v, total) { return (100 * v / total).toFixed(4) + "%"; }

function boxDiv(box, size, colour, cls) {
  const d = document.createElement("div");
  d.className = "box " + (cls || "");
  d.style.left = pct(box[0], size[0]);
  d.style.top = pct(box[1], size[1]);
  d.style.width = pct(Math.max(0, box[2] - box[0]), size[0]);
  d.style.height = pct(Math.max(0, box[3] - box[1]), size[1]);
  d.style.borderColor = colour;
  d.dataset.box = box.join(",");
  return d;
}

function renderPanels(methods) {
  const root = $("panels");
  root.textContent = "";
  for (const m of methods) {
    const scores = [];
    const r = state.results[m];
    const node = $("panel-template").content.firstElementChild.cloneNode(true);
    node.dataset.method = m;
    node.querySelector(".panel-title").textContent = m;
    node.querySelector(".photo").src = state.url;
    const encoded = m in state.encodeMs;
    node.dataset.cached = encoded ? "0" : "1";
    node.querySelector(".panel-note").textContent = `${r.image_size[0]}×${r.image_size[1]} · ` +
      (encoded ? `image encoded in ${state.encodeMs[m]} ms` : "cached image") + ` · text ${r.timing_ms.text} ms`;
    const overlay = node.querySelector(".overlay");
    const list = node.querySelector(".phrase-list");
    r.predictions.forEach((p, i) => {
      const colour = COLOURS[i % COLOURS.length];
      scores.push(p.score);
      const cands = p.candidates.slice(1).map((c) => {
        const d = boxDiv(c.box, p.image_size, colour, "candidate");
        d.dataset.phraseIndex = i;
        d.title = c.score.toFixed(3);
        overlay.append(d);
        return d;
      });
      const box = boxDiv(p.box, p.image_size, colour, "main");
      box.dataset.phrase = p.phrase;
      box.dataset.phraseIndex = i;
      box.dataset.score = p.score;
      const label = document.createElement("span");
      label.className = "label";
      label.style.background = colour;
      label.textContent = `${p.phrase} ${p.score.toFixed(3)}`;
      box.append(label);
      overlay.append(box);
      const li = document.createElement("li");
      li.dataset.phraseIndex = i;
      li.dataset.score = p.score;
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = colour;
      const ph = document.createElement("span");
      ph.className = "phrase";
      ph.textContent = p.phrase + (p.fallback ? " (no candidate: whole image)" : "");
      const sc = document.createElement("span");
      sc.className = "score";
      sc.textContent = p.score.toFixed(3);
      li.append(sw, ph, sc);
      li.title = `${p.candidates.length} candidate(s); hover to show them`;
      li.addEventListener("mouseenter", () => {
        cands.forEach((c) => c.classList.add("show"));
        overlay.querySelectorAll(".box.main").forEach((bx) => bx.classList.toggle("dim", bx !== box));
      });
      li.addEventListener("mouseleave", () => {
        cands.forEach((c) => c.classList.remove("show"));
        overlay.querySelectorAll(".box.main").forEach((bx) => bx.classList.remove("dim"));
      });
      list.append(li);
    });
    root.append(node);
    setupThreshold(node, scores);
  }
  $("json").textContent = methods.length ? JSON.stringify(exportJson(), null, 2) : "";
}

// Each panel has its own slider: score scales differ between methods.
function setupThreshold(panel, scores) {
  const slider = panel.querySelector(".threshold");
  const lo = scores.length ? Math.min(...scores) : 0, hi = scores.length ? Math.max(...scores) : 1;
  const span = Math.max(hi - lo, 1e-3);
  slider.min = (lo - 0.05 * span).toFixed(4);
  slider.max = (hi + 0.05 * span).toFixed(4);
  slider.step = (span / 200).toFixed(5);
  slider.value = slider.min;
  slider.addEventListener("input", () => applyThreshold(panel));
  applyThreshold(panel);
}

function applyThreshold(panel) {
  const slider = panel.querySelector(".threshold");
  const t = parseFloat(slider.value);
  panel.querySelector(".threshold-value").textContent = t.toFixed(3);
  panel.querySelectorAll(".box.main").forEach((b) => b.classList.toggle("below", parseFloat(b.dataset.score) < t));
  panel.querySelectorAll(".phrase-list li").forEach((li) =>
    li.classList.toggle("not-found", parseFloat(li.dataset.score) < t));
}

function exportJson() {
  return { image: state.name, image_id: state.imageId, results: state.results };
}

function download() {
  const blob = new Blob([JSON.stringify(exportJson(), null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = (state.name.replace(/\.[^.]*$/, "") || "clipground") + ".clipground.json";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function setupDrop() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => {
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) { $("examples").value = ""; useImage(f, f.name); }
  });
  $("file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    if (f) { $("examples").value = ""; useImage(f, f.name); }
  });
}

async function main() {
  setupDrop();
  $("examples").addEventListener("change", pickExample);
  $("ground").addEventListener("click", ground);
  $("download").addEventListener("click", download);
  $("phrases").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ground(); });
  $("api-key").value = sessionStorage.getItem("clipground-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("clipground-key", $("api-key").value);
    loadMethods().then(loadExamples).catch((e) => setStatus(e.message, "error"));
  });
  await checkHealth();
  try {
    await loadMethods();
    await loadExamples();
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus(state.auth ? "enter the API key to use this server" : e.message, "error");
    document.body.dataset.ready = "1";
  }
  setInterval(checkHealth, 10000);
}

main();
