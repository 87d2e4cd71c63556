"use strict";
const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(url, options) {
  const res = await fetch(url, options);
  const body = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function figure(hit, onClick) {
  const fig = document.createElement("figure");
  fig.className = "hit";
  fig.dataset.id = hit.id;
  const img = document.createElement("img");
  img.className = "thumb";
  img.loading = "lazy";
  img.src = `/api/thumb/${hit.id}`;
  img.alt = hit.path;
  img.title = hit.path;
  const cap = document.createElement("figcaption");
  const name = document.createElement("span");
  name.textContent = hit.path.split("/").pop();
  const score = document.createElement("span");
  score.textContent = hit.score.toFixed(3) + (hit.reranked ? "*" : "");
  cap.append(name, score);
  fig.append(img, cap);
  fig.addEventListener("click", () => onClick(hit));
  return fig;
}

function showCaptions(list, captions) {
  list.replaceChildren(...captions.map((c) => {
    const li = document.createElement("li");
    li.textContent = `${c.caption} (${c.score.toFixed(2)})`;
    return li;
  }));
}

async function openDetail(hit) {
  $("detail").hidden = false;
  $("detail-img").src = `/api/image/${hit.id}`;
  $("detail-captions").replaceChildren();
  $("detail-similar").replaceChildren();
  try {
    const [caps, sims] = await Promise.all([
      api(`/api/captions/${hit.id}?k=5`).catch((e) => { setStatus(e.message, true); return []; }),
      api(`/api/similar/${hit.id}?k=12`),
    ]);
    showCaptions($("detail-captions"), caps);
    $("detail-similar").replaceChildren(...sims.map((h) => figure(h, openDetail)));
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function search(q) {
  const rerank = $("rerank").checked;
  setStatus("searching…");
  const t0 = performance.now();
  try {
    const hits = await api(`/api/search?q=${encodeURIComponent(q)}&k=40&rerank=${rerank}`);
    $("results").replaceChildren(...hits.map((h) => figure(h, openDetail)));
    setStatus(`${hits.length} results in ${Math.round(performance.now() - t0)} ms`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function captionUpload(file) {
  const form = new FormData();
  form.append("file", file);
  setStatus(`finding captions for ${file.name}…`);
  try {
    const caps = await api("/api/caption?k=5", { method: "POST", body: form });
    $("detail").hidden = false;
    $("detail-img").src = URL.createObjectURL(file);
    showCaptions($("detail-captions"), caps);
    $("detail-similar").replaceChildren();
    setStatus(`captions for ${file.name}`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("q").value.trim();
  if (q) search(q);
});
$("close").addEventListener("click", () => { $("detail").hidden = true; });

let dragDepth = 0;
window.addEventListener("dragenter", (ev) => { ev.preventDefault(); dragDepth++; $("drop").hidden = false; });
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop").hidden = true; } });
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("drop", (ev) => {
  ev.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  const file = ev.dataTransfer.files[0];
  if (file) captionUpload(file);
});

api("/api/status").then((s) => setStatus(`${s.images} images, ${s.captions} captions · model ${s.model}`))
  .catch((e) => setStatus(e.message, true));
