// Prism search page: plain JavaScript over the v1 HTTP API, no build step.
"use strict";

const PAGE_SIZE = 24;
// The server serves results to this depth (offset + k); the last page is cut short to fit.
const RESULT_WINDOW = 1000;
const LAST_PAGE = Math.ceil(RESULT_WINDOW / PAGE_SIZE);
const TARGETS = ["image", "text", "hybrid"];
// Until the shopper picks a target (view.target null) words and "similar" search hybrid: it ranks a
// product first for >= 0.95 of its own titles on the demo catalog (issue 19; BENCHMARKS.md,
// "Commerce retrieval"), where a pure image search misses exact names and SKUs. An uploaded image
// searches images: fused with the image-to-text leg, its exact look-alike at image rank 1 drops
// below any product at image rank 2 that the text leg ranks higher (weights 1:1 over 60 + rank).
const DEFAULT_TARGET = "hybrid";

function targetOf(view) {
  return view.target || (view.image ? "image" : DEFAULT_TARGET);
}
// Attribute filters the panel offers (the catalog's most common attribute names, from
// /v1/facets), each a select whose values and counts come from the last search's facets: the
// counts are over every match of the query, not just the page. The server counts at most 8 facets.
const MAX_ATTRIBUTE_FACETS = 5;
const ATTR = "attr.";
let attributeNames = [];

// What the page shows is a function of one "view" ({q | similar | image, target, filters, page,
// debug}), and the view round-trips through the address bar: reload, a shared link and Back all
// rebuild the same search from the URL instead of from whatever the controls happen to hold.
const state = {
  view: null,
  last: null,       // the last search response
  busy: 0,          // sequence number: late answers to superseded searches are dropped
};

// An uploaded image cannot live in a URL. Its history entry carries a random key instead, so Back
// and Forward within this tab find the file again; random, not counted, because history.state
// outlives a reload and a fresh counter would hand an old entry someone else's image.
const images = new Map();
// "products like …" names the product; a shared link only carries its id, the title is looked up.
const titles = new Map();

const $ = (id) => document.getElementById(id);

function randomKey() {
  // crypto.randomUUID exists only in secure contexts; getRandomValues works on plain http too.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// This tab's visit, for a running canary: it interleaves all of a visit's searches or none, and
// every page of one query alike (docs/feedback.md). Random, kept for the tab only, never stored.
const SESSION = (() => {
  try {
    const known = sessionStorage.getItem("prism-session");
    if (known) return known;
    const made = randomKey();
    sessionStorage.setItem("prism-session", made);
    return made;
  } catch {
    return randomKey(); // storage disabled: one visit per page load
  }
})();

// ---------------------------------------------------------------- the view and the URL

function price(value) {
  // Anything the API would refuse as a price is dropped here, so a hand-edited link still searches.
  if (value === null || value.trim() === "") return "";
  const n = Number(value);
  return Number.isFinite(n) && n >= 0 ? value.trim() : "";
}

function viewFromUrl(href, entry) {
  const p = new URL(href).searchParams;
  const page = Number.parseInt(p.get("page") || "1", 10);
  return {
    q: (p.get("q") || "").trim() || null,
    similar: p.get("similar") || null,
    image: (entry && entry.image) || null,
    target: TARGETS.includes(p.get("target")) ? p.get("target") : null,
    category: p.get("category") || "",
    brand: p.get("brand") || "",
    priceMin: price(p.get("price_min")),
    priceMax: price(p.get("price_max")),
    inStock: p.get("in_stock") === "true",
    attrs: Object.fromEntries(Array.from(p.entries())
      .filter(([key, value]) => key.startsWith(ATTR) && key.length > ATTR.length && value.trim() !== "")
      .slice(0, 16)),
    page: Number.isFinite(page) ? Math.min(Math.max(page, 1), LAST_PAGE) : 1,
    debug: p.get("debug") === "1",
  };
}

function urlFromView(view) {
  const p = new URLSearchParams();
  if (view.similar) p.set("similar", view.similar);
  else if (view.q && !view.image) p.set("q", view.q);
  // Defaults stay out of the URL, so a plain query shares as a short link.
  if (view.target) p.set("target", view.target);
  if (view.category) p.set("category", view.category);
  if (view.brand) p.set("brand", view.brand);
  if (view.priceMin !== "") p.set("price_min", view.priceMin);
  if (view.priceMax !== "") p.set("price_max", view.priceMax);
  if (view.inStock) p.set("in_stock", "true");
  for (const [name, value] of Object.entries(view.attrs || {})) p.set(name, value);
  if (view.page > 1) p.set("page", String(view.page));
  if (view.debug) p.set("debug", "1");
  const query = p.toString();
  return window.location.pathname + (query ? `?${query}` : "");
}

function queryKind(view) {
  if (view.similar) return "similar";
  if (view.image) return images.has(view.image) ? "image" : "lost-image";
  if (view.q) return "text";
  return null;
}

function hasQuery(view) {
  const kind = queryKind(view);
  return kind !== null && kind !== "lost-image";
}

// The view the controls describe, keeping the query (and debug) of `base`.
function viewFromControls(base = state.view) {
  const radio = document.querySelector('input[name="target"]:checked').value;
  return {
    ...base,
    // The radio shows the target in effect; only a different one is the shopper's own choice.
    target: radio === targetOf(base) ? base.target : radio,
    category: $("category").value,
    brand: $("brand").value,
    priceMin: price($("price-min").value),
    priceMax: price($("price-max").value),
    inStock: $("in-stock").checked,
    attrs: attributeControls(base.attrs || {}),
  };
}

// The chosen attribute values: those the selects show, and linked ones the panel has no select for.
function attributeControls(previous) {
  const out = {};
  for (const [key, value] of Object.entries(previous)) {
    if (!document.querySelector(`select[data-attr="${CSS.escape(key)}"]`)) out[key] = value;
  }
  for (const select of document.querySelectorAll("select[data-attr]")) {
    if (select.value) out[select.dataset.attr] = select.value;
  }
  return out;
}

function attributeSelects(view) {
  const box = $("attribute-filters");
  const names = Array.from(new Set([...attributeNames.slice(0, MAX_ATTRIBUTE_FACETS),
    ...Object.keys(view.attrs || {}).map((key) => key.slice(ATTR.length))]));
  for (const name of names) {
    const key = ATTR + name;
    if (box.querySelector(`select[data-attr="${CSS.escape(key)}"]`)) continue;
    const label = document.createElement("label");
    label.append(`${name} `);
    const select = document.createElement("select");
    select.dataset.attr = key;
    select.append(new Option("any", ""));
    select.addEventListener("change", () => go({ ...viewFromControls(), page: 1 }));
    label.append(select);
    box.append(label);
  }
  for (const select of box.querySelectorAll("select[data-attr]")) {
    selectValue(select, (view.attrs || {})[select.dataset.attr] || "");
  }
}

// Values and counts of every attribute select, from a search answer's facets.
function showAttributeFacets(facets) {
  for (const select of document.querySelectorAll("select[data-attr]")) {
    const counts = (facets || {})[`attributes.${select.dataset.attr.slice(ATTR.length)}`];
    if (!counts) continue;
    const chosen = select.value;
    select.replaceChildren(new Option("any", ""));
    for (const [value, count] of Object.entries(counts)) select.append(new Option(`${value} (${count})`, value));
    selectValue(select, chosen);
  }
}

function selectValue(select, value) {
  // A linked filter value the facets do not list (yet, or any more) still has to show as chosen.
  if (value && !Array.from(select.options).some((option) => option.value === value)) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value;
    select.append(option);
  }
  select.value = value;
}

function showControls(view) {
  const radio = document.querySelector(`input[name="target"][value="${targetOf(view)}"]`);
  if (radio) radio.checked = true;
  selectValue($("category"), view.category);
  selectValue($("brand"), view.brand);
  $("price-min").value = view.priceMin;
  $("price-max").value = view.priceMax;
  $("in-stock").checked = view.inStock;
  attributeSelects(view);
  const active = [view.category, view.brand, view.priceMin, view.priceMax].filter((v) => v !== "").length
    + (view.inStock ? 1 : 0) + Object.keys(view.attrs || {}).length;
  $("filters-count").textContent = active ? ` (${active} active)` : "";
  const file = view.image ? images.get(view.image) : null;
  if (file) showQueryImage(file, view.image);
  else hideQueryImage();
}

// Every change of what is searched goes through here. A new search gets its own history entry;
// re-running the same one, or changing filters with nothing searched yet, replaces the entry.
function go(next) {
  const url = urlFromView(next);
  const entry = next.image ? { image: next.image } : {};
  const current = window.location.pathname + window.location.search;
  const shownImage = (history.state && history.state.image) || null;
  const same = url === current && shownImage === (entry.image || null);
  if (hasQuery(next) && !same) history.pushState(entry, "", url);
  else history.replaceState(entry, "", url);
  state.view = next;
  show();
}

// Back, Forward, reload and a shared link: the URL says what to show.
function restore(entry) {
  if ($("detail").open) $("detail").close();
  state.view = viewFromUrl(window.location.href, entry);
  $("q").value = state.view.q && !state.view.similar && !state.view.image ? state.view.q : "";
  show();
}

function show() {
  const view = state.view;
  showControls(view);
  const kind = queryKind(view);
  if (kind === null || kind === "lost-image") {
    ++state.busy;  // an answer still on its way belongs to a search no longer shown
    document.body.removeAttribute("aria-busy");
    state.last = null;
    $("results").replaceChildren();
    $("pager").hidden = true;
    setStatus(kind === "lost-image"
      ? "An image search cannot be restored from the address: choose or drop the image again."
      : "");
    return;
  }
  search(view);
}

function filtersOf(view) {
  const out = {};
  if (view.category) out.category = [view.category];
  if (view.brand) out.brand = [view.brand];
  if (view.priceMin !== "") out.price_min = Number(view.priceMin);
  if (view.priceMax !== "") out.price_max = Number(view.priceMax);
  if (view.inStock) out.in_stock = true;
  return out;
}

function facetNames(view) {
  const names = Object.keys(view.attrs || {}).map((key) => key.slice(ATTR.length));
  for (const name of attributeNames) if (names.length < MAX_ATTRIBUTE_FACETS && !names.includes(name)) names.push(name);
  return names.slice(0, MAX_ATTRIBUTE_FACETS).map((name) => `attributes.${name}`);
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

function searchRequest(view) {
  const f = filtersOf(view);
  const facets = facetNames(view);
  const offset = (view.page - 1) * PAGE_SIZE;
  const k = Math.min(PAGE_SIZE, RESULT_WINDOW - offset);
  const kind = queryKind(view);
  if (kind === "text") {
    const params = new URLSearchParams({ q: view.q, target: targetOf(view), k, offset, session: SESSION });
    for (const [key, value] of Object.entries(f)) {
      for (const v of [].concat(value)) params.append(key, v);
    }
    for (const [key, value] of Object.entries(view.attrs || {})) params.append(key, value);
    if (facets.length) params.set("facets", facets.join(","));
    return request(`/v1/search?${params}`);
  }
  if (kind === "image") {
    const file = images.get(view.image);
    const form = new FormData();
    form.append("file", file, file.name || "query-image");
    form.append("target", targetOf(view));
    form.append("k", k);
    form.append("offset", offset);
    form.append("session", SESSION);
    for (const [key, value] of Object.entries(f)) {
      for (const v of [].concat(value)) form.append(key, v);
    }
    for (const [key, value] of Object.entries(view.attrs || {})) form.append(key, value);
    if (facets.length) form.append("facets", facets.join(","));
    return request("/v1/search/image", { method: "POST", body: form });
  }
  const attributes = Object.fromEntries(Object.entries(view.attrs || {})
    .map(([key, value]) => [key.slice(ATTR.length), [value]]));
  return request("/v1/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ similar_to: view.similar, target: targetOf(view), k, offset,
      filters: { ...f, attributes }, facets, session: SESSION }),
  });
}

async function lookUpTitle(productId) {
  if (titles.has(productId)) return;
  try {
    const product = await request(`/v1/products/${encodeURIComponent(productId)}`);
    titles.set(productId, product.title);
  } catch (_) {
    // The id stands in for the title; the search itself reports an unknown product.
  }
}

async function search(view) {
  const ticket = ++state.busy;
  setStatus("Searching…");
  document.body.setAttribute("aria-busy", "true");
  try {
    const [result] = await Promise.all([searchRequest(view), view.similar ? lookUpTitle(view.similar) : null]);
    if (ticket !== state.busy) return;
    state.last = result;
    showAttributeFacets(result.facets);
    render(result, view);
  } catch (error) {
    if (ticket !== state.busy) return;
    renderError(error.message);
  } finally {
    if (ticket === state.busy) document.body.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------- feedback events

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
    event_id: randomKey(), type, query_id: queryId, product_id: hit.product_id,
    position: hit.rank, ts: new Date().toISOString(),
  };
}

// ---------------------------------------------------------------- rendering

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function describeQuery(view) {
  const kind = queryKind(view);
  if (kind === "text") return `“${view.q}”`;
  if (kind === "image") return "your image";
  return `products like “${titles.get(view.similar) || view.similar}”`;
}

function formatPrice(hit) {
  if (hit.price === null || hit.price === undefined) return "";
  if (hit.currency) {
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: hit.currency }).format(hit.price);
    } catch (_) {
      // Not a currency Intl knows: the code itself still tells the shopper what the amount means.
      return `${hit.price.toFixed(2)} ${hit.currency}`;
    }
  }
  return new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 }).format(hit.price);
}

// Scores mean something to whoever tunes the ranking, nothing to a shopper: only with ?debug=1.
function formatScore(hit) {
  const parts = Object.entries(hit.scores || {}).map(([index, value]) => `${index} ${value.toFixed(3)}`);
  return `score ${hit.score.toFixed(3)}` + (parts.length > 1 ? ` (${parts.join(", ")})` : "");
}

function render(result, view) {
  const list = $("results");
  list.replaceChildren();
  const template = $("card-template");
  result.results.forEach((hit) => {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.productId = hit.product_id;
    card.dataset.rank = hit.rank;
    card.dataset.category = hit.category || "";
    const img = card.querySelector("img");
    // A product with several images shows the one the query matched.
    const shown = hit.matched_image || hit.image_url;
    if (shown) {
      img.src = shown;
      if (hit.matched_image && hit.matched_image !== hit.image_url) card.dataset.matchedImage = hit.matched_image;
    } else {
      card.querySelector(".thumb").classList.add("no-image");
      img.remove();
    }
    card.querySelector(".title").textContent = hit.title;
    card.querySelector(".brand").textContent = hit.brand || "";
    card.querySelector(".price").textContent = formatPrice(hit);
    const score = card.querySelector(".score");
    if (view.debug) {
      score.textContent = formatScore(hit);
      score.hidden = false;
    } else {
      score.remove();
    }
    card.querySelector(".open").addEventListener("click", () => openResult(hit, result.query_id));
    card.querySelector(".similar").addEventListener("click", () => searchSimilar(hit));
    card.querySelector(".similar").setAttribute("aria-label", `Find products similar to ${hit.title}`);
    list.append(card);
  });
  sendEvents(result.results.map((hit) => feedbackEvent("impression", result.query_id, hit)));

  const first = result.offset + 1;
  const last = result.offset + result.results.length;
  const where = `${describeQuery(view)} → ${result.target}`;
  if (result.results.length === 0) {
    setStatus(result.offset > 0 ? `No more results for ${where}.` : `No results for ${where}.`);
  } else {
    setStatus(`Results ${first}–${last} for ${where} · ${Math.round(result.took_ms)} ms`);
  }
  $("pager").hidden = result.offset === 0 && result.results.length < result.k;
  $("prev").disabled = result.offset === 0;
  $("next").disabled = result.results.length < result.k || result.offset + result.k >= RESULT_WINDOW;
  $("page-info").textContent = `page ${view.page}`;
  // Paging or "similar" from far down the grid: bring the new results' start into view.
  if ($("status").getBoundingClientRect().top < 0) $("status").scrollIntoView();
}

function renderError(message) {
  $("results").replaceChildren();
  $("pager").hidden = true;
  setStatus(`Search failed: ${message}`, true);
}

function addFact(list, label, value) {
  if (value === null || value === undefined || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  dd.textContent = typeof value === "string" ? value : JSON.stringify(value);
  list.append(dt, dd);
}

// Every activation of a result goes through here: the one place where a click is reported.
function openResult(hit, queryId) {
  sendEvents([feedbackEvent("click", queryId, hit)]);
  const dialog = $("detail");
  dialog.dataset.queryId = queryId;
  dialog.dataset.position = hit.rank;
  dialog.dataset.productId = hit.product_id;
  const img = $("detail-image");
  const shown = hit.matched_image || hit.image_url;
  img.hidden = !shown;
  if (shown) {
    img.src = shown;
    img.alt = hit.title;
  }
  showGallery(hit, shown);
  $("detail-title").textContent = hit.title;
  $("detail-price").textContent = formatPrice(hit);
  $("detail-description").textContent = hit.description || "";
  const facts = $("detail-facts");
  facts.replaceChildren();
  addFact(facts, "Brand", hit.brand);
  addFact(facts, "Category", hit.category);
  for (const [key, value] of Object.entries(hit.attributes || {})) addFact(facts, key, value);
  addFact(facts, "Product id", hit.product_id);
  if (state.view.debug) addFact(facts, "Score", formatScore(hit));
  $("detail-similar").onclick = () => {
    dialog.close();
    searchSimilar(hit);
  };
  dialog.showModal();
}

// The product's images, as thumbnails under the detail view's image (only when it has several);
// a thumbnail shows its image large. The list comes from GET /v1/products/{id}.
async function showGallery(hit, shown) {
  const gallery = $("detail-gallery");
  gallery.replaceChildren();
  gallery.hidden = true;
  let product;
  try {
    const response = await fetch(`/v1/products/${encodeURIComponent(hit.product_id)}`);
    if (!response.ok) return;
    product = await response.json();
  } catch {
    return;
  }
  const images = product.images || [];
  // The dialog may show another product by now.
  if (images.length < 2 || $("detail").dataset.productId !== hit.product_id) return;
  images.forEach((url, n) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "gallery-thumb";
    button.setAttribute("aria-label", `Image ${n + 1} of ${images.length}`);
    if (url === shown) button.setAttribute("aria-current", "true");
    const thumb = document.createElement("img");
    thumb.src = url;
    thumb.alt = "";
    button.append(thumb);
    button.addEventListener("click", () => {
      $("detail-image").src = url;
      $("detail-image").hidden = false;
      gallery.querySelectorAll("[aria-current]").forEach((b) => b.removeAttribute("aria-current"));
      button.setAttribute("aria-current", "true");
    });
    gallery.append(button);
  });
  gallery.hidden = false;
}

// ---------------------------------------------------------------- query entry points

function searchText(text) {
  go({ ...viewFromControls(), q: text, similar: null, image: null, page: 1 });
}

function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That file is not an image.", true);
    return;
  }
  const key = randomKey();
  images.set(key, file);
  $("q").value = "";
  go({ ...viewFromControls(), q: null, similar: null, image: key, page: 1 });
}

function searchSimilar(hit) {
  titles.set(hit.product_id, hit.title);
  $("q").value = "";
  go({ ...viewFromControls(), q: null, similar: hit.product_id, image: null, page: 1 });
}

let previewUrl = null;

function showQueryImage(file, key) {
  if ($("query-image").dataset.key === key) return;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("query-image-preview").src = previewUrl;
  $("query-image-name").textContent = file.name || "";
  $("query-image").dataset.key = key;
  $("query-image").hidden = false;
}

function hideQueryImage() {
  $("query-image").hidden = true;
  delete $("query-image").dataset.key;
  $("image-input").value = "";
}

// ---------------------------------------------------------------- facets and wiring

async function loadFacets() {
  try {
    const facets = await request("/v1/facets");
    attributeNames = facets.attributes || [];
    if (facets.credits) {
      $("credits").textContent = facets.credits;
      $("credits").hidden = false;
    }
    for (const [id, values] of [["category", facets.categories], ["brand", facets.brands]]) {
      const select = $(id);
      select.replaceChildren(select.options[0]);
      for (const { value, count } of values) {
        const option = document.createElement("option");
        option.value = value;
        option.textContent = `${value} (${count})`;
        select.append(option);
      }
    }
    if (state.view) showControls(state.view);
  } catch (_) {
    // Filters still work as plain "any"; searches report their own errors.
  }
}

function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("q").value.trim();
    if (text) searchText(text);
    else if (hasQuery(state.view)) go({ ...viewFromControls(), page: 1 });
    else setStatus("Type what you are looking for, or choose an image.", true);
  });
  $("image-input").addEventListener("change", (event) => searchImage(event.target.files[0]));
  $("clear-image").addEventListener("click", () => go({ ...viewFromControls(), image: null, page: 1 }));
  for (const input of document.querySelectorAll('input[name="target"], #category, #brand, #price-min, #price-max, #in-stock')) {
    input.addEventListener("change", () => go({ ...viewFromControls(), page: 1 }));
  }
  $("prev").addEventListener("click", () => go({ ...state.view, page: Math.max(1, state.view.page - 1) }));
  $("next").addEventListener("click", () => go({ ...state.view, page: Math.min(LAST_PAGE, state.view.page + 1) }));
  $("filters-toggle").addEventListener("click", () => {
    const toggle = $("filters-toggle");
    const open = toggle.getAttribute("aria-expanded") !== "true";
    toggle.setAttribute("aria-expanded", String(open));
    $("controls").classList.toggle("open", open);
  });
  window.addEventListener("popstate", (event) => restore(event.state));

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
}

// A search started before the facets answer (a quick shopper, a test) builds on the address's
// view: with none yet, reading its filters failed ("null has no attrs") and the search was lost.
state.view = viewFromUrl(window.location.href, history.state);
wire();
// The filter values (and the attribute names whose counts a search asks for) first, so the first
// search is the only one and its facets fill the panel.
loadFacets().finally(() => {
  // Words typed while the facets loaded, not yet sent, stay in the box (restore empties it for an
  // address with no query, and the Enter that followed found nothing to search).
  const typed = $("q").value;
  restore(history.state);
  if (!hasQuery(state.view) && typed) $("q").value = typed;
  // The address as the page understood it: dropped junk parameters do not linger in a shared link.
  history.replaceState(history.state, "", urlFromView(state.view));
});
