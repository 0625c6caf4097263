// muralist web UI: plain JavaScript over the public /api/v1 API (no private endpoints, no CDN).
"use strict";

const state = { lang: localStorage.getItem("muralist.lang") || "en", strings: {}, key: localStorage.getItem("muralist.key") || "",
                lastSeed: null, jobs: new Map() };
const $ = (id) => document.getElementById(id);

function t(key, vars = {}) {
  let s = state.strings[key] || key;
  for (const [k, v] of Object.entries(vars)) s = s.replace(`{${k}}`, v);
  return s;
}

async function loadLanguage(lang) {
  const r = await fetch(`/ui/i18n/${lang}.json`);
  state.strings = await r.json();
  state.lang = lang;
  localStorage.setItem("muralist.lang", lang);
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  $("lang").value = lang;
  state.jobs.forEach((job) => renderJob(job));
}

function headers(extra = {}) {
  return state.key ? { Authorization: `Bearer ${state.key}`, ...extra } : extra;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    err.status = r.status;
    throw err;
  }
  return r.json();
}

async function imageURL(id) {
  const r = await fetch(`/api/v1/images/${id}`, { headers: headers() });
  return URL.createObjectURL(await r.blob());
}

function showError(msg) { $("error").textContent = msg || ""; }

// ---------------------------------------------------------------- account

async function refreshAccount() {
  try {
    const me = await api("/api/v1/me");
    $("whoami").textContent = me.name;
    $("signout").hidden = !state.key;
    $("login").hidden = Boolean(state.key);
    showError("");
    return me;
  } catch (e) {
    $("whoami").textContent = "";
    $("login").hidden = false;
    showError(e.message);
    return null;
  }
}

// ---------------------------------------------------------------- form

async function fillChoices(me) {
  const [models, samplers] = await Promise.all([api("/api/v1/models"), api("/api/v1/samplers")]);
  const fill = (sel, values, current) => {
    sel.innerHTML = "";
    for (const v of values) sel.add(new Option(v, v, false, v === current));
  };
  const opts = (me && me.options) || {};
  fill($("model"), models.checkpoints.map((c) => c.title), opts.model);
  fill($("sampler_name"), samplers.samplers, opts.sampler_name || "Euler a");
  fill($("scheduler"), ["Automatic", ...samplers.schedulers.filter((s) => s !== "Automatic")], opts.scheduler || "Automatic");
  const vae = $("vae");
  vae.innerHTML = "";
  vae.add(new Option(t("settings.automatic"), ""));
  for (const v of models.vaes) vae.add(new Option(v.name, v.name, false, v.name === opts.vae));
  fill($("hr_upscaler"), [...samplers.latent_upscale_modes, ...models.upscalers], "Latent");
  fill($("extras-upscaler"), models.upscalers, "Lanczos");
  const [modules, cnModels] = await Promise.all([api("/controlnet/module_list?alias_names=true"), api("/controlnet/model_list")]);
  state.cn = { modules: modules.module_list, models: ["None", ...cnModels.model_list] };
  document.querySelectorAll(".cn-unit").forEach(fillUnit);
  const styles = await api("/api/v1/styles");
  fill($("styles"), styles.styles.map((st) => st.name), null);
  $("admin-tab").hidden = !(me && me.admin);
  // Downloads: admins, and users an admin allowed (max_downloads); merging and cards: admins.
  const admin = Boolean(me && me.admin);
  $("get-models").hidden = !(admin || (me && me.limits && me.limits.max_downloads > 0));
  $("get-admin").hidden = !admin;
  if (admin) await fillGetModels();
}

let tokenTimer = null;
function countTokens() {
  clearTimeout(tokenTimer);
  tokenTimer = setTimeout(async () => {
    const r = await api(`/api/v1/token-count?prompt=${encodeURIComponent($("prompt").value)}&steps=${$("steps").value || 20}`);
    $("tokens").textContent = `${r.tokens}/${r.limit}`;
  }, 250);
}

// ---------------------------------------------------------------- img2img image and mask painting

const paint = { loaded: false, painted: false, drawing: false };

function loadInitImage(file) {
  const reader = new FileReader();
  reader.onload = () => loadInitURL(reader.result);
  reader.readAsDataURL(file);
}

function loadInitURL(url) {
  {
    const img = new Image();
    img.onload = () => {
      for (const c of [$("init-canvas"), $("mask-canvas")]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
      $("init-canvas").getContext("2d").drawImage(img, 0, 0);
      clearMask();
      paint.loaded = true;
      $("canvas-wrap").hidden = false;
      $("mask-tools").hidden = false;
      $("outpaint-tools").hidden = false;
    };
    img.src = url;
  }
}

function clearMask() {
  const ctx = $("mask-canvas").getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, $("mask-canvas").width, $("mask-canvas").height);
  paint.painted = false;
}

function paintAt(ev) {
  brush($("mask-canvas"), ev, Number($("brush").value));
  paint.painted = true;
}

// ---------------------------------------------------------------- ControlNet units (sd-webui-controlnet's fields)

function fillUnit(el) {
  const cn = state.cn || { modules: ["none"], models: ["None"] };
  for (const [cls, values] of [["cn-module", cn.modules], ["cn-model", cn.models]]) {
    const sel = el.querySelector(`.${cls}`);
    const current = sel.value || sel.dataset.want;
    sel.innerHTML = "";
    for (const v of values) sel.add(new Option(v, v, false, v === current));
    if (current && !values.includes(current)) sel.add(new Option(current, current, false, true));
  }
}

function addUnit() {
  const el = $("cn-unit").content.firstElementChild.cloneNode(true);
  el.querySelectorAll("[data-i18n]").forEach((n) => { n.textContent = t(n.dataset.i18n); });
  const canvas = el.querySelector(".cn-canvas");
  const show = (w, h) => { canvas.width = w; canvas.height = h; canvas.hidden = false; el.dataset.image = "1"; };
  el.querySelector(".cn-file").onchange = async (ev) => {
    const file = ev.target.files[0];
    if (!file) return;
    const img = new Image();
    img.onload = () => { show(img.naturalWidth, img.naturalHeight); canvas.getContext("2d").drawImage(img, 0, 0); };
    img.src = await fileDataURL(file);
  };
  el.querySelector(".cn-blank").onclick = () => {  // draw a scribble: white lines on black, as scribble models expect
    show(Number($("width").value), Number($("height").value));
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "black";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  };
  let drawing = false;
  canvas.addEventListener("pointerdown", (ev) => { drawing = true; canvas.setPointerCapture(ev.pointerId); brush(canvas, ev, 6); });
  canvas.addEventListener("pointermove", (ev) => { if (drawing) brush(canvas, ev, 6); });
  canvas.addEventListener("pointerup", () => { drawing = false; });
  el.querySelector(".cn-preview").onclick = async () => {
    if (!el.dataset.image) return showError(t("cn.image"));
    try {
      const r = await api("/controlnet/detect", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ controlnet_module: el.querySelector(".cn-module").value, controlnet_input_images: [canvas.toDataURL("image/png")] }) });
      const out = el.querySelector(".cn-detected");
      out.src = `data:image/png;base64,${r.images[0]}`;
      out.hidden = false;
    } catch (e) { showError(e.message); }
  };
  el.querySelector(".cn-remove").onclick = () => el.remove();
  fillUnit(el);
  $("cn-units").append(el);
  return el;
}

function unitParams() {
  const units = [];
  for (const el of document.querySelectorAll(".cn-unit")) {
    const q = (cls) => el.querySelector(`.${cls}`);
    if (!q("cn-enabled").checked || q("cn-model").value === "None") continue;
    units.push({ enabled: true, module: q("cn-module").value, model: q("cn-model").value, weight: Number(q("cn-weight").value),
                 guidance_start: Number(q("cn-start").value), guidance_end: Number(q("cn-end").value),
                 control_mode: q("cn-mode").value, resize_mode: q("cn-resize").value, pixel_perfect: q("cn-pp").checked,
                 ...(el.dataset.image ? { image: q("cn-canvas").toDataURL("image/png") } : {}) });
  }
  return units;
}

function applyUnits(p) {
  // "ControlNet N" infotext entries: Module, Model, Weight, ... (the image itself is not in the infotext)
  const keys = Object.keys(p).filter((k) => /^ControlNet \d+$/.test(k)).sort();
  keys.forEach((k, i) => {
    const el = document.querySelectorAll(".cn-unit")[i] || addUnit();
    const f = {};
    for (const item of p[k].replace(/^"|"$/g, "").split(",")) { const [a, b] = item.split(": "); if (b !== undefined) f[a.trim()] = b.trim(); }
    const set = (cls, v) => { if (v !== undefined) { const n = el.querySelector(`.${cls}`); n.dataset.want = v; n.value = v; } };
    set("cn-module", f.Module); set("cn-model", f.Model); set("cn-weight", f.Weight); set("cn-start", f["Guidance Start"]);
    set("cn-end", f["Guidance End"]); set("cn-mode", f["Control Mode"]); set("cn-resize", f["Resize Mode"]);
    el.querySelector(".cn-pp").checked = f["Pixel Perfect"] === "True";
    fillUnit(el);
  });
}

function brush(c, ev, size) {
  const r = c.getBoundingClientRect();
  const sx = c.width / r.width, sy = c.height / r.height;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "white";
  ctx.beginPath();
  ctx.arc((ev.clientX - r.left) * sx, (ev.clientY - r.top) * sy, (size / 2) * sx, 0, 2 * Math.PI);
  ctx.fill();
}

function formParams() {
  const num = (id) => Number($(id).value);
  const outpaint = ["outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom"].map((id) => [id, num(id)]);
  const outpainting = outpaint.some(([, v]) => v > 0);
  const img2img = paint.loaded ? {
    init_images: [$("init-canvas").toDataURL("image/png")], denoising_strength: num("denoising_strength"),
    ...(outpainting ? Object.fromEntries(outpaint) : {}),
    ...(paint.painted && !outpainting ? { mask: $("mask-canvas").toDataURL("image/png"), mask_blur: num("mask_blur"),
                          inpainting_fill: num("inpainting_fill"), inpaint_full_res: $("inpaint_full_res").value === "1" } : {}),
  } : {};
  return {
    ...img2img,
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, model: $("model").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value, steps: num("steps"), cfg_scale: num("cfg_scale"),
    width: num("width"), height: num("height"), seed: num("seed"), n_iter: num("n_iter"), batch_size: num("batch_size"),
    subseed: num("subseed"), subseed_strength: num("subseed_strength"), vae: $("vae").value || null,
    styles: [...$("styles").selectedOptions].map((o) => o.value),
    ...($("enable_hr").checked && !paint.loaded ? { enable_hr: true, hr_scale: num("hr_scale"), hr_upscaler: $("hr_upscaler").value,
                                                    hr_second_pass_steps: num("hr_second_pass_steps") } : {}),
    controlnet: unitParams(),
  };
}

async function generate(ev) {
  if (ev) ev.preventDefault();
  showError("");
  try {
    const job = await api("/api/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify({ type: paint.loaded ? "img2img" : "txt2img", params: formParams() }) });
    const view = { id: job.id, status: job.status, position: job.position, step: 0, steps: 0, eta: null, images: [], infotexts: [] };
    state.jobs.set(job.id, view);
    renderJob(view);
    follow(view);
  } catch (e) {
    showError(e.message);
  }
}

// ---------------------------------------------------------------- jobs and live progress

async function follow(view) { await streamEvents(view.id, (ev) => onEvent(view, ev)); }

async function streamEvents(id, handle) {
  // fetch + a stream reader, because EventSource cannot send the Authorization header.
  const r = await fetch(`/api/v1/jobs/${id}/events`, { headers: headers() });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = chunk.split("\n").find((l) => l.startsWith("data: "));
      if (data) await handle(JSON.parse(data.slice(6)));
    }
  }
}

async function onEvent(view, ev) {
  if (ev.type === "state") { view.status = ev.status; view.position = ev.position; }
  if (ev.type === "queued") { view.position = ev.position; }
  if (ev.type === "started") view.status = "running";
  if (ev.type === "progress") {
    Object.assign(view, { status: "running", step: ev.step, steps: ev.steps, eta: ev.eta });
    if (ev.preview) view.preview = `data:image/png;base64,${ev.preview}`;
  }
  if (["finished", "failed", "canceled"].includes(ev.type) || ["succeeded", "failed", "canceled"].includes(view.status)) {
    const job = await api(`/api/v1/jobs/${view.id}`);
    view.status = job.status;
    view.error = job.error;
    if (job.result) {
      view.infotexts = job.result.infotexts;
      view.images = await Promise.all(job.result.images.map(imageURL));
      if (job.result.seeds.length) state.lastSeed = job.result.seeds[0];
    }
  }
  renderJob(view);
}

function statusText(v) {
  if (v.status === "queued") return t("status.queued", { position: (v.position ?? 0) + 1 });
  if (v.status === "running") return t("status.running", { step: v.step, steps: v.steps, eta: v.eta == null ? "?" : v.eta.toFixed(1) });
  if (v.status === "failed") return t("status.failed", { error: v.error || "" });
  return t(`status.${v.status}`);
}

function renderJob(v) {
  let el = document.querySelector(`.job[data-id="${CSS.escape(v.id)}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = "job";
    el.dataset.id = v.id;
    $("jobs").prepend(el);
  }
  const active = v.status === "queued" || v.status === "running";
  el.dataset.status = v.status;
  el.innerHTML = "";
  const status = document.createElement("div");
  status.className = "status";
  status.textContent = statusText(v);
  el.append(status);
  if (v.status === "running") {
    const bar = document.createElement("progress");
    bar.max = v.steps || 1;
    bar.value = v.step;
    el.append(bar);
    if (v.preview) { const p = new Image(); p.src = v.preview; p.className = "preview"; p.alt = "preview"; el.append(p); }
  }
  if (active) {
    for (const [label, action] of [["interrupt", "cancel"], ["skip", "skip"]]) {
      if (label === "skip" && v.status !== "running") continue;
      const b = document.createElement("button");
      b.textContent = t(v.status === "queued" ? "cancel" : label);
      b.className = `job-${label}`;
      b.onclick = () => api(`/api/v1/jobs/${v.id}/${action}`, { method: "POST" }).catch((e) => showError(e.message));
      el.append(b);
    }
  }
  if (v.images.length) {
    const box = document.createElement("div");
    box.className = "images";
    v.images.forEach((src, i) => {
      const fig = document.createElement("figure");
      const img = new Image();
      img.src = src;
      img.alt = v.infotexts[i] || "";
      const cap = document.createElement("figcaption");
      cap.className = "infotext";
      cap.textContent = v.infotexts[i] || "";
      fig.append(img, cap);
      box.append(fig);
    });
    el.append(box);
  }
}

// ---------------------------------------------------------------- queue and history

async function showQueue() {
  const q = await api("/api/v1/queue");
  const list = $("queue-list");
  list.innerHTML = "";
  for (const j of [...q.running, ...q.queued]) {
    const li = document.createElement("li");
    li.dataset.id = j.id;
    const progress = j.progress || {};
    li.textContent = `${j.id} — ${statusText({ ...j, step: progress.step || 0, steps: progress.steps || 0, eta: progress.eta })}`;
    const b = document.createElement("button");
    b.textContent = t("cancel");
    b.onclick = async () => { await api(`/api/v1/jobs/${j.id}/cancel`, { method: "POST" }); showQueue(); };
    li.append(" ", b);
    list.append(li);
  }
  $("queue-others").textContent = t("queue.others", { count: q.others_queued });
}

function parseInfotext(text) {
  const lines = text.split("\n");
  const params = {};
  for (const m of lines[lines.length - 1].matchAll(/\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g)) {
    let v = m[2];
    if (v.length > 1 && v.startsWith('"') && v.endsWith('"')) { try { v = JSON.parse(v); } catch { /* keep as written */ } }
    params[m[1]] = v;
  }
  const neg = lines.findIndex((l) => l.startsWith("Negative prompt:"));
  params.prompt = lines.slice(0, neg >= 0 ? neg : lines.length - 1).join("\n");
  params.negative = neg >= 0 ? lines.slice(neg, lines.length - 1).join("\n").replace(/^Negative prompt: /, "") : "";
  return params;
}

function applyInfotext(text) {
  const p = parseInfotext(text);
  $("prompt").value = p.prompt;
  $("negative_prompt").value = p.negative;
  if (p.Steps) $("steps").value = p.Steps;
  if (p["CFG scale"]) $("cfg_scale").value = p["CFG scale"];
  if (p.Seed) $("seed").value = p.Seed;
  if (p.Sampler) $("sampler_name").value = p.Sampler;
  // A1111's paste: a missing "Schedule type" is Automatic, a missing variation strength is 0.
  $("scheduler").value = p["Schedule type"] || "Automatic";
  if (p.Size) { const [w, h] = p.Size.split("x"); $("width").value = w; $("height").value = h; }
  if (p["Variation seed"]) $("subseed").value = p["Variation seed"];
  $("subseed_strength").value = p["Variation seed strength"] || 0;
  if (p["Denoising strength"]) $("denoising_strength").value = p["Denoising strength"];
  // Hires fix is on when a denoising strength comes with a hires key (A1111's rule).
  $("enable_hr").checked = !!p["Denoising strength"] && !!(p["Hires upscale"] || p["Hires upscaler"] || p["Hires resize"]);
  if (p["Hires upscale"]) $("hr_scale").value = p["Hires upscale"];
  if (p["Hires upscaler"]) $("hr_upscaler").value = p["Hires upscaler"];
  $("hr_second_pass_steps").value = p["Hires steps"] || 0;
  applyUnits(p);
  countTokens();
}

async function showHistory() {
  const { images } = await api("/api/v1/images?limit=60");
  const box = $("history");
  box.innerHTML = images.length ? "" : `<p>${t("history.empty")}</p>`;
  for (const rec of images) {
    const fig = document.createElement("figure");
    fig.className = "history-item";
    const img = new Image();
    img.alt = rec.infotext;
    imageURL(rec.id).then((u) => { img.src = u; });
    const cap = document.createElement("figcaption");
    cap.className = "infotext";
    cap.textContent = rec.infotext;
    const reuse = document.createElement("button");
    reuse.textContent = t("history.reuse");
    reuse.onclick = () => { applyInfotext(rec.infotext); selectTab("txt2img"); };
    const toImg = document.createElement("button");
    toImg.textContent = t("history.to_img2img");
    toImg.onclick = () => { applyInfotext(rec.infotext); loadInitURL(img.src); selectTab("txt2img"); };
    const dl = document.createElement("a");
    dl.textContent = t("history.download");
    dl.download = `${rec.id}.png`;
    imageURL(rec.id).then((u) => { dl.href = u; });
    const del = document.createElement("button");
    del.textContent = t("history.delete");
    del.className = "history-delete";
    del.onclick = async () => { await api(`/api/v1/images/${rec.id}`, { method: "DELETE" }); fig.remove(); };
    fig.append(img, cap, reuse, toImg, dl, del);
    box.append(fig);
  }
}

async function previewURL(kind, name) {
  const r = await fetch(`/api/v1/models/preview?kind=${kind}&name=${encodeURIComponent(name)}`, { headers: headers() });
  return r.ok ? URL.createObjectURL(await r.blob()) : null;
}

async function showModels() {
  const m = await api("/api/v1/models");
  const ec = m.embedding_cards || {};
  // A1111's extra-networks click: the tag (with the card's preferred weight), then its activation text.
  const loraTag = (l) => `<lora:${l.name}:${l.preferred_weight || 1}>` + (l.activation_text ? ` ${l.activation_text}` : "");
  const groups = {
    checkpoint: m.checkpoints.map((c) => ({ ...c, label: c.title, name: c.title, sub: c.family, insert: null })),
    lora: m.loras.map((l) => ({ ...l, label: l.alias || l.name, sub: l.hash, insert: loraTag(l) })),
    embedding: m.embeddings.map((e) => ({ ...(ec[e] || {}), label: e, name: e, sub: "", insert: e })),
  };
  for (const [kind, items] of Object.entries(groups)) {
    const box = $(`cards-${kind}`);
    box.innerHTML = "";
    for (const it of items) {
      const card = document.createElement("button");
      card.type = "button";
      card.className = `card card-${kind}`;
      card.dataset.name = it.name;
      card.title = it.description ? it.description.replace(/<[^>]*>/g, "") : (it.insert ? t("models.insert") : it.label);
      const img = new Image();
      img.alt = "";
      previewURL(kind, it.name).then((u) => { if (u) img.src = u; });
      const label = document.createElement("div");
      label.textContent = it.label;
      const sub = document.createElement("small");
      sub.textContent = [it.sub, it.base_model].filter(Boolean).join(" · ");
      card.append(img, label, sub);
      if (it.activation_text) {
        const words = document.createElement("small");
        words.className = "activation";
        words.title = t("models.activation");
        words.textContent = it.activation_text;
        card.append(words);
      }
      card.onclick = () => {
        if (kind === "checkpoint") { $("model").value = it.name; }
        else { const p = $("prompt"); p.value = (p.value ? `${p.value} ` : "") + it.insert; countTokens(); }
        selectTab("txt2img");
      };
      box.append(card);
    }
  }
}

// ---------------------------------------------------------------- get models (admin)

async function fillGetModels() {
  const m = await api("/api/v1/models");
  const titles = m.checkpoints.map((c) => c.title);
  for (const [id, blank] of [["mg-primary", false], ["mg-secondary", false], ["mg-tertiary", true]]) {
    const sel = $(id), keep = sel.value;
    sel.innerHTML = "";
    if (blank) sel.add(new Option(t("get.none"), ""));
    for (const v of titles) sel.add(new Option(v, v, false, v === keep));
  }
  const vae = $("mg-vae");
  vae.innerHTML = "";
  vae.add(new Option(t("get.none"), ""));
  for (const v of m.vaes) vae.add(new Option(v.name, v.name));
}

async function adminJob(type, params, out, done) {
  // One job, followed to its end through its events; the status line shows its progress.
  out.textContent = t("get.queued");
  try {
    const job = await api("/api/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify({ type, params }) });
    const mib = (b) => (b / 1048576).toFixed(1);
    await streamEvents(job.id, async (ev) => {
      if (ev.type !== "progress") return;
      out.textContent = ev.bytes != null
        ? t("get.progress", { done: mib(ev.bytes), total: ev.total ? mib(ev.total) : "?", speed: mib(ev.speed || 0),
                              eta: ev.eta == null ? "?" : Math.round(ev.eta) })
        : t("get.working", { step: ev.step, steps: ev.steps });
    });
    const view = await api(`/api/v1/jobs/${job.id}`);
    out.textContent = view.status === "succeeded" ? done(view.result) : t("get.failed", { error: view.error || view.status });
    if (view.status === "succeeded") {
      await fillChoices(await api("/api/v1/me"));  // refills the merger's selects too (admins)
      await showModels();
    }
  } catch (e) { out.textContent = t("get.failed", { error: e.message }); }
}

function startDownload(ev) {
  ev.preventDefault();
  const source = $("dl-source").value;
  const refKey = { hf: "repo", modelscope: "model_id", civitai: "version_id", url: "url" }[source];
  const params = { source, [refKey]: $("dl-ref").value.trim(), kind: $("dl-kind").value };
  for (const k of ["file", "revision", "name", "sha256"]) { const v = $(`dl-${k}`).value.trim(); if (v) params[k] = v; }
  adminJob("download", params, $("dl-status"), (r) => t("get.downloaded", { file: r.file }));
}

function startMerge(ev) {
  ev.preventDefault();
  const params = { primary: $("mg-primary").value, secondary: $("mg-secondary").value, method: $("mg-method").value,
                   multiplier: Number($("mg-multiplier").value), save_as_half: $("mg-fp16").checked };
  for (const [k, id] of [["tertiary", "mg-tertiary"], ["bake_in_vae", "mg-vae"], ["discard_weights", "mg-discard"], ["name", "mg-name"]]) {
    const v = $(id).value.trim();
    if (v) params[k] = v;
  }
  adminJob("merge", params, $("merge-status"), (r) => t("get.merged", { file: r.file }));
}

async function showSettings() {
  const [me, m, samplers] = await Promise.all([api("/api/v1/me"), api("/api/v1/models"), api("/api/v1/samplers")]);
  const o = me.options || {};
  const fill = (sel, values, current) => { sel.innerHTML = ""; for (const [v, l] of values) sel.add(new Option(l, v, false, v === current)); };
  fill($("set-model"), m.checkpoints.map((c) => [c.title, c.title]), o.model || $("model").value);
  fill($("set-sampler_name"), samplers.samplers.map((s) => [s, s]), o.sampler_name || "Euler a");
  fill($("set-vae"), [["", t("settings.automatic")], ...m.vaes.map((v) => [v.name, v.name])], o.vae || "");
  $("set-steps").value = o.steps || 20;
  $("set-cfg_scale").value = o.cfg_scale || 7;
  $("set-clip_skip").value = o.clip_skip || 1;
}

async function saveSettings(ev) {
  ev.preventDefault();
  const body = { model: $("set-model").value, sampler_name: $("set-sampler_name").value, steps: Number($("set-steps").value),
                 cfg_scale: Number($("set-cfg_scale").value), clip_skip: Number($("set-clip_skip").value), vae: $("set-vae").value || null };
  try {
    await api("/api/v1/me/options", { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    $("settings-saved").textContent = t("settings.saved");
    const me = await api("/api/v1/me");
    await fillChoices(me);
    $("steps").value = body.steps;
    $("cfg_scale").value = body.cfg_scale;
  } catch (e) { showError(e.message); }
}

function fileDataURL(file) {
  return new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(file); });
}

async function runExtras(ev) {
  ev.preventDefault();
  const file = $("extras-file").files[0];
  if (!file) return;
  try {
    const params = { image: await fileDataURL(file), upscaling_resize: Number($("extras-scale").value), upscaler_1: $("extras-upscaler").value,
                     codeformer_visibility: Number($("extras-codeformer").value), codeformer_weight: Number($("extras-codeformer-weight").value) };
    const job = await api("/api/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ type: "extras", params }) });
    let done;
    for (;;) {
      done = await api(`/api/v1/jobs/${job.id}`);
      if (["succeeded", "failed", "canceled"].includes(done.status)) break;
      await new Promise((r) => setTimeout(r, 300));
    }
    const out = $("extras-out");
    out.innerHTML = "";
    if (done.status !== "succeeded") { showError(done.error || done.status); return; }
    const img = new Image();
    img.src = await imageURL(done.result.images[0]);
    const cap = document.createElement("pre");
    cap.textContent = done.result.infotexts[0];
    out.append(img, cap);
  } catch (e) { showError(e.message); }
}

async function pngInfo() {
  const file = $("pnginfo-file").files[0];
  if (!file) return;
  const url = await fileDataURL(file);
  const info = await api("/api/v1/png-info", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image: url }) });
  $("pnginfo-text").textContent = info.infotext || t("pnginfo.none");
  $("pnginfo-send").hidden = $("pnginfo-send-img2img").hidden = !info.infotext;
  $("pnginfo-send").onclick = () => { applyInfotext(info.infotext); selectTab("txt2img"); };
  $("pnginfo-send-img2img").onclick = () => { applyInfotext(info.infotext); loadInitURL(url); selectTab("txt2img"); };
}

async function showAdmin() {
  const [users, status] = await Promise.all([api("/api/v1/admin/users"), api("/api/v1/admin/status")]);
  const list = $("admin-users");
  list.innerHTML = "";
  for (const u of users.users) {
    const li = document.createElement("li");
    li.dataset.name = u.name;
    li.textContent = `${u.name}${u.admin ? " (admin)" : ""} — ${u.queued} `;
    const reset = document.createElement("button");
    reset.textContent = t("admin.reset");
    reset.onclick = async () => { const r = await api(`/api/v1/admin/users/${encodeURIComponent(u.name)}/reset-key`, { method: "POST" });
                                  $("admin-key").textContent = t("admin.key", { name: r.name, key: r.key }); };
    const rm = document.createElement("button");
    rm.textContent = t("admin.remove");
    rm.onclick = async () => { await api(`/api/v1/admin/users/${encodeURIComponent(u.name)}`, { method: "DELETE" }).catch((e) => showError(e.message)); showAdmin(); };
    li.append(reset, " ", rm);
    list.append(li);
  }
  $("admin-running").innerHTML = "";
  for (const j of status.running) { const li = document.createElement("li"); li.textContent = `${j.owner}: ${j.id}`; $("admin-running").append(li); }
  $("admin-loaded").innerHTML = "";
  for (const m of status.loaded_models) { const li = document.createElement("li"); li.textContent = m; $("admin-loaded").append(li); }
  const rows = $("admin-workers").tBodies[0];
  rows.innerHTML = "";
  const gib = (b) => (b == null ? "" : `${(b / 2 ** 30).toFixed(2)} GiB`);
  for (const w of status.workers) {
    const tr = rows.insertRow();
    tr.dataset.name = w.name;
    tr.dataset.state = w.state;
    const mem = w.memory || {};
    const free = mem.device_free_bytes != null ? ` (${t("admin.w_free")} ${gib(mem.device_free_bytes)})` : "";
    for (const text of [w.name, `${w.node || ""} / ${w.device || ""}`, t(`admin.state_${w.state}`), w.job_id || "",
                        (w.models || []).map((m) => m.label || m.kind).join(", "), gib(mem.models_bytes) + free]) {
      tr.insertCell().textContent = text;
    }
  }
}

async function addUser(ev) {
  ev.preventDefault();
  try {
    const r = await api("/api/v1/admin/users", { method: "POST", headers: { "Content-Type": "application/json" },
                                                  body: JSON.stringify({ name: $("admin-name").value, admin: $("admin-admin").checked }) });
    $("admin-key").textContent = t("admin.key", { name: r.name, key: r.key });
    $("admin-name").value = "";
    showAdmin();
  } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- training (datasets, LoRA jobs)

async function showTrain() {
  const [models, ds] = await Promise.all([api("/api/v1/models"), api("/api/v1/datasets")]);
  const sel = $("tr-pretrained_model_name_or_path");
  const keep = sel.value;
  sel.innerHTML = "";
  for (const c of models.checkpoints) sel.add(new Option(c.title, c.title, false, c.title === keep));
  const list = $("ds-list");
  const current = list.value;
  list.innerHTML = "";
  for (const d of ds.datasets) list.add(new Option(d.name, d.name, false, d.name === current));
  if (list.value) showDataset(list.value);
}

async function showDataset(name) {
  const ds = await api(`/api/v1/datasets/${encodeURIComponent(name)}`);
  const box = $("ds-images");
  box.innerHTML = "";
  for (const im of ds.images) {
    const card = document.createElement("figure");
    card.className = "card ds-item";
    const img = new Image();
    img.alt = im.path;
    fetch(`/api/v1/datasets/${encodeURIComponent(name)}/images/${im.path.split("/").map(encodeURIComponent).join("/")}`,
          { headers: headers() }).then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); });
    const cap = document.createElement("textarea");
    cap.value = im.caption;
    cap.rows = 2;
    cap.onchange = () => api(`/api/v1/datasets/${encodeURIComponent(name)}/captions`, { method: "PUT",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image: im.path, caption: cap.value }) }).catch((e) => showError(e.message));
    card.append(img, cap);
    box.append(card);
  }
}

async function uploadDataset(ev) {
  ev.preventDefault();
  try {
    const name = $("ds-name").value.trim();
    await api(`/api/v1/datasets/${encodeURIComponent(name)}`, { method: "PUT", headers: { "Content-Type": "application/zip" },
                                                              body: $("ds-file").files[0] });
    await showTrain();
    $("ds-list").value = name;
    showDataset(name);
  } catch (e) { showError(e.message); }
}

function trainParams() {
  const p = { train_data_dir: $("ds-list").value };
  for (const el of document.querySelectorAll("#train-form [id^=tr-]")) {
    const key = el.id.slice(3);
    if (el.type === "checkbox") p[key] = el.checked;
    else if (el.value.trim() === "") continue;
    else if (["sample_prompts", "resolution", "output_name", "pretrained_model_name_or_path"].includes(key) || el.tagName === "SELECT") p[key] = el.value;
    else p[key] = Number(el.value);
  }
  return p;
}

function drawLoss(losses) {
  const c = $("loss-chart");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (losses.length < 2) return;
  const lo = Math.min(...losses), hi = Math.max(...losses);
  ctx.strokeStyle = "#e8743b";
  ctx.beginPath();
  losses.forEach((v, i) => {
    const x = (i / (losses.length - 1)) * (c.width - 4) + 2, y = c.height - 4 - ((v - lo) / (hi - lo || 1)) * (c.height - 8);
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
}

async function startTraining(ev) {
  ev.preventDefault();
  showError("");
  $("train-result").innerHTML = "";
  try {
    const params = trainParams();
    const job = await api("/api/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify({ type: "train_lora", params }) });
    const losses = [];
    $("train-status").textContent = statusText({ status: job.status, position: job.position });
    await streamEvents(job.id, async (e) => {
      if (e.type === "progress" && e.loss !== undefined) {
        losses.push(e.loss);
        drawLoss(losses);
        $("train-status").textContent = t("train.progress", { epoch: e.epoch, epochs: e.n_iter, step: e.step, steps: e.steps,
                                                               loss: e.loss.toFixed(4), eta: e.eta == null ? "?" : e.eta.toFixed(0) });
      } else if (e.type === "saved") {
        $("train-status").textContent = t("train.saved", { name: e.name });
      } else if (["finished", "failed", "canceled"].includes(e.type)) {
        const done = await api(`/api/v1/jobs/${job.id}`);
        if (done.status !== "succeeded") { $("train-status").textContent = statusText(done); return; }
        const name = done.result.lora;
        $("train-status").textContent = t("train.done", { name });
        const use = document.createElement("button");
        use.type = "button";
        use.id = "train-use";
        use.textContent = t("train.use");
        use.onclick = () => { const pr = $("prompt"); pr.value = `${pr.value} <lora:${name}:0.8>`.trim(); countTokens(); selectTab("txt2img"); };
        $("train-result").append(`${name} `, use);
      }
    });
  } catch (e) { showError(e.message); }
}

function selectTab(name) {
  document.querySelectorAll("[role=tab]").forEach((b) => b.setAttribute("aria-selected", String(b.dataset.tab === name)));
  document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== `tab-${name}`; });
  if (name === "queue") showQueue().catch((e) => showError(e.message));
  if (name === "history") showHistory().catch((e) => showError(e.message));
  if (name === "models") showModels().catch((e) => showError(e.message));
  if (name === "settings") showSettings().catch((e) => showError(e.message));
  if (name === "train") showTrain().catch((e) => showError(e.message));
  if (name === "admin") showAdmin().catch((e) => showError(e.message));
}

// ---------------------------------------------------------------- wiring

async function start() {
  // Every handler is wired before the first await: a sign-in pressed while the language file is
  // still loading must not fall through to the browser's native form submit (a page reload).
  $("lang").onchange = () => loadLanguage($("lang").value);
  $("login").onsubmit = async (ev) => {
    ev.preventDefault();
    state.key = $("apikey").value.trim();
    localStorage.setItem("muralist.key", state.key);
    $("apikey").value = "";
    const me = await refreshAccount();
    if (me) await fillChoices(me);
  };
  $("signout").onclick = () => { state.key = ""; localStorage.removeItem("muralist.key"); location.reload(); };
  document.querySelectorAll("[role=tab]").forEach((b) => { b.onclick = () => selectTab(b.dataset.tab); });
  $("gen").onsubmit = generate;
  $("settings").onsubmit = saveSettings;
  $("extras-form").onsubmit = runExtras;
  $("pnginfo-file").onchange = () => pngInfo().catch((e) => showError(e.message));
  $("admin-add").onsubmit = addUser;
  $("dl-form").onsubmit = startDownload;
  $("merge-form").onsubmit = startMerge;
  $("info-all").onclick = () => adminJob("model_info", { all: true }, $("info-status"), (r) => t("get.info_done", r));
  $("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) generate(ev); });
  $("prompt").addEventListener("input", countTokens);
  $("swap").onclick = () => { const w = $("width").value; $("width").value = $("height").value; $("height").value = w; };
  $("seed-random").onclick = () => { $("seed").value = -1; };
  $("init-file").onchange = () => { if ($("init-file").files[0]) loadInitImage($("init-file").files[0]); };
  $("init-clear").onclick = () => {
    paint.loaded = false;
    $("init-file").value = "";
    for (const id of ["canvas-wrap", "mask-tools", "outpaint-tools"]) $(id).hidden = true;
  };
  $("mask-clear").onclick = clearMask;
  $("mask-file").onchange = async () => {
    const file = $("mask-file").files[0];
    if (!file) return;
    const img = new Image();
    img.onload = () => {
      const c = $("mask-canvas");
      c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);
      paint.painted = true;
    };
    img.src = await fileDataURL(file);
  };
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", (ev) => { paint.drawing = true; mask.setPointerCapture(ev.pointerId); paintAt(ev); });
  mask.addEventListener("pointermove", (ev) => { if (paint.drawing) paintAt(ev); });
  mask.addEventListener("pointerup", () => { paint.drawing = false; });
  $("seed-reuse").onclick = () => { if (state.lastSeed != null) $("seed").value = state.lastSeed; };
  $("cn-add").onclick = () => addUnit();
  $("ds-upload").onsubmit = uploadDataset;
  $("ds-list").onchange = () => showDataset($("ds-list").value).catch((e) => showError(e.message));
  $("train-form").onsubmit = startTraining;
  await loadLanguage(state.lang);
  const me = await refreshAccount();
  if (me) await fillChoices(me).catch((e) => showError(e.message));
  countTokens();
}

start();
