// The page of `finegrain serve`: each chosen photo goes to POST /predict; the answer is drawn as bars, the photo
// with every branch's box, the crops and the attention maps. No library and no resource from outside this server.
"use strict";

// finegrain.visualize.PALETTE: the same colour for the same box as in `finegrain predict --save-viz`
const PALETTE = ["#d62728", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#2ca02c", "#8c564b"];
const TOP_K = 5;
const TILE = 220; // canvas pixels of a crop or map tile

const drop = document.getElementById("drop");
const input = document.getElementById("files");
const results = document.getElementById("results");

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function svgElement(tag, attributes) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

async function showModel() {
  const info = document.getElementById("model-info");
  try {
    const response = await fetch("/model");
    const model = await response.json();
    info.textContent = `${model.method} · ${model.classes} species · ${model.input_size} px input · ` +
      `model ${model.checkpoint} (${model.checkpoint_id})`;
  } catch (error) {
    info.textContent = "The server does not answer: is `finegrain serve` still running?";
  }
}

async function predict(file) {
  const card = element("article", { class: "card" });
  const status = element("p", { class: "status", text: "Looking at the bird…" });
  card.append(element("h2", { text: file.name }), status);
  results.prepend(card);
  const form = new FormData();
  form.append("file", file, file.name);
  let response, body;
  try {
    response = await fetch(`/predict?top_k=${TOP_K}&preview=true`, { method: "POST", body: form });
    body = await response.json();
  } catch (error) {
    showError(card, status, `${file.name}: the server did not answer (${error.message}); is it still running?`);
    return;
  }
  if (!response.ok) {
    showError(card, status, typeof body.detail === "string" ? body.detail : `error ${response.status}`);
    return;
  }
  status.remove();
  card.querySelector("h2").remove();
  await showResult(card, file.name, body);
}

function showError(card, status, message) {
  status.replaceWith(element("p", { class: "error", role: "alert", text: message }));
  card.classList.add("failed");
}

async function showResult(card, name, body) {
  const top = body.predictions[0];
  card.classList.add("done");
  card.append(element("h2", { class: "top1", text: `${top.label} ${(100 * top.score).toFixed(1)}%` }),
              element("p", { class: "source muted", text: name }));
  const image = new Image();
  image.alt = `${name}, with the regions the model looked at`;
  image.src = body.preview;
  await image.decode();
  const layout = element("div", { class: "layout" });
  layout.append(photoWithBoxes(image, body), element("div", {}, bars(body.predictions), ...tiles(image, body)));
  card.append(layout);
}

function photoWithBoxes(image, body) {
  const { width, height } = body.image;
  const figure = element("div", { class: "photo" }, image);
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
                                  role: "img", "aria-label": "boxes" });
  const [ix1, iy1, ix2, iy2] = body.input_box;
  // the margins the eval centre crop cut off fade to white: the network never saw them
  svg.append(svgElement("path", { d: `M0 0H${width}V${height}H0Z M${ix1} ${iy1}V${iy2}H${ix2}V${iy1}Z`,
                                  fill: "#fff", "fill-opacity": 0.6, "fill-rule": "evenodd" }));
  Object.entries(body.boxes).forEach(([boxName, [x1, y1, x2, y2]], i) => {
    const colour = PALETTE[i % PALETTE.length];
    svg.append(svgElement("rect", { class: "box", x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: "none",
                                    stroke: colour, "stroke-width": 3, "vector-effect": "non-scaling-stroke" }));
    const tag = element("span", { class: "tag", text: boxName });
    tag.style.cssText = `position:absolute;left:${(100 * Math.max(x1, 0)) / width}%;` +
      `top:${(100 * Math.max(y1, 0)) / height}%;background:${colour};color:#fff;font:600 13px/1.3 system-ui;` +
      "padding:0 4px;";
    figure.append(tag);
  });
  figure.append(svg);
  return figure;
}

function bars(predictions) {
  const list = element("ol", { class: "bars", "aria-label": "Top species" });
  for (const p of predictions) {
    const percent = 100 * p.score;
    const fill = element("div", { class: "fill" });
    fill.style.width = `${percent}%`;
    list.append(element("li", {}, element("span", { class: "label", text: p.label }),
                        element("div", { class: "track" }, fill),
                        element("span", { class: "pct", text: `${percent.toFixed(1)}%` })));
  }
  return list;
}

function tiles(image, body) {
  const sections = [];
  const boxes = Object.entries(body.boxes);
  if (boxes.length) {
    const grid = element("div", { class: "tiles" });
    boxes.forEach(([name, box], i) => grid.append(tile(image, body, name, box, PALETTE[i % PALETTE.length])));
    sections.push(element("h3", { text: "Where it zoomed" }), grid);
  }
  const maps = Object.entries(body.attention_maps);
  if (maps.length) {
    const grid = element("div", { class: "tiles" });
    for (const [name, map] of maps) grid.append(tile(image, body, name, map.region, "#555", map));
    sections.push(element("h3", { text: "Attention and activation maps" }), grid);
  }
  return sections;
}

// One square tile: the photo inside `box` (photo pixels), aspect kept, and the attention map over it if given.
function tile(image, body, name, box, colour, map = null) {
  const canvas = element("canvas", { width: TILE, height: TILE, role: "img", "aria-label": name });
  const context = canvas.getContext("2d");
  const scale = image.naturalWidth / body.image.width; // photo pixels -> preview pixels
  const [x1, y1, x2, y2] = box;
  const fit = TILE / Math.max(x2 - x1, y2 - y1);
  const dw = (x2 - x1) * fit, dh = (y2 - y1) * fit, dx = (TILE - dw) / 2, dy = (TILE - dh) / 2;
  // the part of the box inside the photo; a box over the edge shows blank there
  const cx1 = Math.max(x1, 0), cy1 = Math.max(y1, 0);
  const cx2 = Math.min(x2, body.image.width), cy2 = Math.min(y2, body.image.height);
  if (cx2 > cx1 && cy2 > cy1) {
    context.drawImage(image, cx1 * scale, cy1 * scale, (cx2 - cx1) * scale, (cy2 - cy1) * scale,
                      dx + (cx1 - x1) * fit, dy + (cy1 - y1) * fit, (cx2 - cx1) * fit, (cy2 - cy1) * fit);
  }
  if (map) context.drawImage(heat(map), dx, dy, dw, dh);
  const view = element("div", { class: "view" }, canvas);
  view.style.borderColor = colour;
  return element("figure", { class: "tile" }, view, element("figcaption", { text: name }));
}

// A map's values in [0, 1] as a small canvas, blue (low) to red (high), half transparent.
function heat(map) {
  const canvas = element("canvas", { width: map.width, height: map.height });
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(map.width, map.height);
  map.values.flat().forEach((v, i) => {
    pixels.data.set([Math.round(255 * v), Math.round(255 * (1 - Math.abs(2 * v - 1))), Math.round(255 * (1 - v)),
                     150], 4 * i);
  });
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function predictAll(files) {
  for (const file of files) predict(file); // all at once: the server batches requests that arrive together
}

input.addEventListener("change", () => { predictAll(input.files); input.value = ""; });
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
});
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("dragging"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  predictAll(event.dataTransfer.files);
});
showModel();
