// Prism search page: plain JavaScript over the v1 HTTP API, no build step.
"use strict";

const PAGE_SIZE = 24;
// The server serves results to this depth (offset + k); the last page is cut short to fit.
const RESULT_WINDOW = 1000;

const state = {
  query: null,      // {kind: "text", text} | {kind: "image", file} | {kind: "similar", productId, title}
  offset: 0,
  last: null,       // the last search response
  busy: 0,          // sequence number: late answers to superseded searches are dropped
};

const $ = (id) => document.getElementById(id);

function target() {
  return document.querySelector('input[name="target"]:checked').value;
}

function filters() {
  const out = {};
  const category = $("category").value;
  const brand = $("brand").value;
  const min = $("price-min").value;
  const max = $("price-max").value;
  if (category) out.category = [category];
  if (brand) out.brand = [brand];
  if (min !== "") out.price_min = Number(min);
  if (max !== "") out.price_max = Number(max);
  return out;
}

// ---------------------------------------------------------------- requests

async function request(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

function searchRequest(query, offset) {
  const f = filters();
  const k = Math.min(PAGE_SIZE, RESULT_WINDOW - offset);
  if (query.kind === "text") {
    const params = new URLSearchParams({ q: query.text, target: target(), k, offset });
    for (const [key, value] of Object.entries(f)) {
      for (const v of [].concat(value)) params.append(key, v);
    }
    return request(`/v1/search?${params}`);
  }
  if (query.kind === "image") {
    const form = new FormData();
    form.append("file", query.file, query.file.name || "query-image");
    form.append("target", target());
    form.append("k", k);
    form.append("offset", offset);
    for (const [key, value] of Object.entries(f)) {
      for (const v of [].concat(value)) form.append(key, v);
    }
    return request("/v1/search/image", { method: "POST", body: form });
  }
  return request("/v1/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ similar_to: query.productId, target: target(), k, offset, filters: f }),
  });
}

async function search(offset = 0) {
  if (!state.query) return;
  const ticket = ++state.busy;
  state.offset = offset;
  setStatus("Searching…");
  document.body.setAttribute("aria-busy", "true");
  try {
    const result = await searchRequest(state.query, offset);
    if (ticket !== state.busy) return;
    state.last = result;
    render(result);
  } catch (error) {
    if (ticket !== state.busy) return;
    renderError(error.message);
  } finally {
    if (ticket === state.busy) document.body.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------- feedback events

function eventId() {
  // crypto.randomUUID exists only in secure contexts; getRandomValues works on plain http too.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Fire and forget, but not lost on a hiccup: one retry with the same event ids, which the server
// counts once. `keepalive` lets a click report outlive a page that navigates away.
async function sendEvents(events, retries = 1) {
  if (!events.length) return;
  try {
    const response = await fetch("/v1/events", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(events),
      keepalive: true,
    });
    if (response.status >= 500 && retries > 0) throw new Error(`${response.status}`);
  } catch (_) {
    if (retries > 0) setTimeout(() => sendEvents(events, retries - 1), 1000);
  }
}

function feedbackEvent(type, queryId, hit) {
  return {
    event_id: eventId(), type, query_id: queryId, product_id: hit.product_id,
    position: hit.rank, ts: new Date().toISOString(),
  };
}

// ---------------------------------------------------------------- rendering

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function describeQuery(query) {
  if (query.kind === "text") return `“${query.text}”`;
  if (query.kind === "image") return "your image";
  return `products like “${query.title || query.productId}”`;
}

function formatPrice(hit) {
  if (hit.price === null || hit.price === undefined) return "";
  const amount = hit.price.toFixed(2);
  return hit.currency ? `${amount} ${hit.currency}` : amount;
}

function render(result) {
  const list = $("results");
  list.replaceChildren();
  const template = $("card-template");
  result.results.forEach((hit, index) => {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.productId = hit.product_id;
    card.dataset.rank = hit.rank;
    card.dataset.category = hit.category || "";
    const img = card.querySelector("img");
    if (hit.image_url) {
      img.src = hit.image_url;
      img.alt = hit.title;
    } else {
      card.querySelector(".thumb").classList.add("no-image");
      img.remove();
    }
    card.querySelector(".title").textContent = hit.title;
    card.querySelector(".price").textContent = formatPrice(hit);
    card.querySelector(".score").textContent = `score ${hit.score.toFixed(3)}`;
    card.querySelector(".open").addEventListener("click", () => openResult(hit, result.query_id));
    card.querySelector(".similar").addEventListener("click", () => searchSimilar(hit));
    card.querySelector(".similar").setAttribute("aria-label", `Find products similar to ${hit.title}`);
    list.append(card);
  });
  sendEvents(result.results.map((hit) => feedbackEvent("impression", result.query_id, hit)));

  const first = result.offset + 1;
  const last = result.offset + result.results.length;
  const where = `${describeQuery(state.query)} → ${result.target}`;
  if (result.results.length === 0) {
    setStatus(result.offset > 0 ? `No more results for ${where}.` : `No results for ${where}.`);
  } else {
    setStatus(`Results ${first}–${last} for ${where} · ${Math.round(result.took_ms)} ms`);
  }
  $("pager").hidden = result.offset === 0 && result.results.length < result.k;
  $("prev").disabled = result.offset === 0;
  $("next").disabled = result.results.length < result.k || result.offset + result.k >= RESULT_WINDOW;
  $("page-info").textContent = `page ${Math.floor(result.offset / PAGE_SIZE) + 1}`;
  // Paging or "similar" from far down the grid: bring the new results' start into view.
  if ($("status").getBoundingClientRect().top < 0) $("status").scrollIntoView();
}

function renderError(message) {
  $("results").replaceChildren();
  $("pager").hidden = true;
  setStatus(`Search failed: ${message}`, true);
}

// Every activation of a result goes through here: the one place where a click is reported.
function openResult(hit, queryId) {
  sendEvents([feedbackEvent("click", queryId, hit)]);
  const dialog = $("detail");
  dialog.dataset.queryId = queryId;
  dialog.dataset.position = hit.rank;
  const img = $("detail-image");
  img.hidden = !hit.image_url;
  if (hit.image_url) {
    img.src = hit.image_url;
    img.alt = hit.title;
  }
  $("detail-title").textContent = hit.title;
  $("detail-meta").textContent = [formatPrice(hit), hit.brand, hit.category, `id ${hit.product_id}`]
    .filter(Boolean).join(" · ");
  $("detail-description").textContent = hit.description || "";
  const attrs = $("detail-attributes");
  attrs.replaceChildren();
  for (const [key, value] of Object.entries(hit.attributes || {})) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "string" ? value : JSON.stringify(value);
    attrs.append(dt, dd);
  }
  $("detail-similar").onclick = () => {
    dialog.close();
    searchSimilar(hit);
  };
  dialog.showModal();
}

// ---------------------------------------------------------------- query entry points

function searchText(text) {
  clearImage(false);
  state.query = { kind: "text", text };
  const url = new URL(window.location);
  url.searchParams.set("q", text);
  url.searchParams.set("target", target());
  history.replaceState(null, "", url);
  search(0);
}

function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That file is not an image.", true);
    return;
  }
  state.query = { kind: "image", file };
  const preview = $("query-image-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  $("query-image-name").textContent = file.name || "";
  $("query-image").hidden = false;
  $("q").value = "";
  search(0);
}

function searchSimilar(hit) {
  clearImage(false);
  state.query = { kind: "similar", productId: hit.product_id, title: hit.title };
  search(0);
}

function clearImage(resetQuery = true) {
  $("query-image").hidden = true;
  $("image-input").value = "";
  if (resetQuery && state.query && state.query.kind === "image") state.query = null;
}

// ---------------------------------------------------------------- facets and wiring

async function loadFacets() {
  try {
    const facets = await request("/v1/facets");
    if (facets.credits) {
      $("credits").textContent = facets.credits;
      $("credits").hidden = false;
    }
    for (const [id, values] of [["category", facets.categories], ["brand", facets.brands]]) {
      const select = $(id);
      for (const { value, count } of values) {
        const option = document.createElement("option");
        option.value = value;
        option.textContent = `${value} (${count})`;
        select.append(option);
      }
    }
  } catch (_) {
    // Filters still work as plain "any"; searches report their own errors.
  }
}

function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("q").value.trim();
    if (text) searchText(text);
    else if (state.query) search(0);
    else setStatus("Type what you are looking for, or choose an image.", true);
  });
  $("image-input").addEventListener("change", (event) => searchImage(event.target.files[0]));
  $("clear-image").addEventListener("click", () => clearImage(true));
  for (const input of document.querySelectorAll('input[name="target"], #category, #brand, #price-min, #price-max')) {
    input.addEventListener("change", () => search(0));
  }
  $("prev").addEventListener("click", () => search(Math.max(0, state.offset - PAGE_SIZE)));
  $("next").addEventListener("click", () => search(state.offset + PAGE_SIZE));

  // Drag and drop anywhere on the page.
  const overlay = $("drop-overlay");
  let depth = 0;
  const carriesFiles = (event) => Array.from(event.dataTransfer ? event.dataTransfer.types : []).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!carriesFiles(event)) return;
    depth += 1;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) overlay.hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (carriesFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) searchImage(file);
  });

  const params = new URLSearchParams(window.location.search);
  const wanted = params.get("target");
  if (wanted) {
    const radio = document.querySelector(`input[name="target"][value="${CSS.escape(wanted)}"]`);
    if (radio) radio.checked = true;
  }
  if (params.get("q")) {
    $("q").value = params.get("q");
    searchText(params.get("q"));
  }
}

wire();
loadFacets();
