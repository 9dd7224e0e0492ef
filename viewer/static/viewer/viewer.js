/* The viewer: one series in a canvas, windowed exactly in the browser from packed PNGs.
 *
 * Each slice's packed PNG (archive/render.py) is decoded once to its 16-bit stored values;
 * a window change builds one 64 Ki-entry table and maps the values through it. The whole
 * series is prefetched after the first paint, so scrolling never waits once it is loaded.
 * window.pacsViewer exposes the state for the browser tests and benchmarks.
 */
"use strict";

(function () {
  performance.mark("viewer-js-start");
  const I = window.PacsImaging;
  const data = JSON.parse(document.getElementById("viewer-data").textContent);
  const overlay = JSON.parse(document.getElementById("overlay-data").textContent);
  const $ = (id) => document.getElementById(id);
  const viewport = $("viewport"), display = $("display"), slider = $("slider");
  const displayContext = display.getContext("2d");
  const imageCanvas = document.createElement("canvas");
  const imageContext = imageCanvas.getContext("2d");
  const scratch = document.createElement("canvas");
  const scratchContext = scratch.getContext("2d", { willReadFrequently: true });
  const PREFETCH_CONCURRENCY = 4;

  const state = {
    series: data.chosen,
    slices: data.slices,
    index: 0,
    center: null,
    width: null,
    invert: false,
    zoom: 1,
    fitted: true,
    panX: 0,
    panY: 0,
    tool: "window",
    measurements: new Map(), // "sop/frame" -> [{p, q}]
    drawing: null,
    playing: false,
    loaded: 0,
    generation: 0, // bumps when the series changes: late loads of the old one are dropped
  };
  const cache = new Map(); // "sop/frame" -> {words | rgba, range}
  const pending = new Map(); // "sop/frame" -> Promise
  let table = null, tableKey = "";
  let imageData = null;
  let resolveFirst, resolveAll;
  const api = {
    state, imageCanvas, paints: 0, firstPaint: null, losslessPaint: null,
    firstPainted: new Promise((r) => (resolveFirst = r)),
    allLoaded: new Promise((r) => (resolveAll = r)),
    show, setWindow, loadSeries, imageToScreen, screenToImage,
    pixel: (column, row) => imageContext.getImageData(column, row, 1, 1).data[0],
    rgba: (column, row) => Array.from(imageContext.getImageData(column, row, 1, 1).data),
    measurementLabels: () => {
      const slice = state.slices[state.index];
      return (state.measurements.get(keyOf(slice)) || []).map((line) => measureText(line, slice));
    },
  };
  window.pacsViewer = api;

  // ------------------------------------------------------------------ loading

  const keyOf = (slice) => `${slice.sop}/${slice.frame}`;
  const urlOf = (slice, kind) => `/render/instances/${slice.sop}/frames/${slice.frame}/${kind}.png?v=${slice.version}`;

  function load(slice) {
    const key = keyOf(slice);
    if (cache.has(key)) return Promise.resolve(cache.get(key));
    if (pending.has(key)) return pending.get(key);
    const kind = slice.packed ? "packed" : "preview";
    const promise = fetch(urlOf(slice, kind))
      .then((response) => {
        if (!response.ok) throw new Error(`image ${response.status}`);
        return response.blob();
      })
      .then((blob) => createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" }))
      .then((bitmap) => {
        scratch.width = bitmap.width;
        scratch.height = bitmap.height;
        scratchContext.drawImage(bitmap, 0, 0);
        const rgba = scratchContext.getImageData(0, 0, bitmap.width, bitmap.height).data;
        bitmap.close();
        let entry;
        if (slice.colour || !slice.packed) {
          entry = { rgba, columns: scratch.width, rows: scratch.height, range: [0, 255] };
        } else {
          const words = I.unpack(rgba, scratch.width * scratch.height);
          entry = { words, columns: scratch.width, rows: scratch.height, range: I.valueRange(words, slice) };
        }
        cache.set(key, entry);
        pending.delete(key);
        return entry;
      })
      .catch((error) => {
        pending.delete(key);
        throw error;
      });
    pending.set(key, promise);
    return promise;
  }

  function prefetch() {
    const generation = state.generation;
    const order = [];
    for (let d = 0; d < state.slices.length; d++) {
      for (const i of [state.index + d, state.index - d]) {
        if (i >= 0 && i < state.slices.length && !order.includes(i)) order.push(i);
      }
    }
    let next = 0, failed = 0;
    const total = state.slices.length;
    const progress = () => {
      const done = state.slices.filter((s) => cache.has(keyOf(s))).length;
      state.loaded = done;
      $("progress").textContent = done + failed >= total
        ? (failed ? `${done} / ${total} loaded, ${failed} failed` : `All ${total} loaded`)
        : `Loading ${done} / ${total}`;
      $("progress").style.setProperty("--done", `${(100 * done) / total}%`);
      if (done + failed >= total) resolveAll(done);
    };
    const worker = () => {
      if (generation !== state.generation || next >= order.length) return Promise.resolve();
      const slice = state.slices[order[next++]];
      return load(slice).then(progress, () => { failed++; progress(); }).then(worker);
    };
    progress();
    for (let k = 0; k < PREFETCH_CONCURRENCY; k++) worker();
  }

  function loadSeries(uid) {
    return fetch(`/studies/${data.study}/series/${uid}/slices.json`)
      .then((r) => { if (!r.ok) throw new Error(`series ${r.status}`); return r.json(); })
      .then((answer) => {
        state.generation++;
        state.series = uid;
        state.slices = answer.slices;
        state.index = 0;
        state.center = state.width = null;
        state.fitted = true;
        state.panX = state.panY = 0;
        for (const item of document.querySelectorAll(".strip-item")) item.classList.toggle("active", item.dataset.series === uid);
        const url = new URL(location.href);
        url.searchParams.set("series", uid);
        history.replaceState(null, "", url);
        api.allLoaded = new Promise((r) => (resolveAll = r));
        start();
      });
  }

  // ------------------------------------------------------------------ painting

  function defaultWindow(slice, entry) {
    if (slice.windows && slice.windows.length) return [slice.windows[0].center, slice.windows[0].width];
    if (slice.colour || !slice.packed) return [128, 256]; // the identity on 0..255
    const [lo, hi] = entry.range;
    return [(lo + hi + 1) / 2, Math.max(hi - lo + 1, 1)];
  }

  function show(index) {
    if (!state.slices.length) return;
    state.index = Math.max(0, Math.min(state.slices.length - 1, index));
    slider.value = state.index + 1;
    const slice = state.slices[state.index];
    const entry = cache.get(keyOf(slice));
    if (entry) {
      paint(slice, entry);
    } else {
      updateOverlay();
      const wanted = state.index, generation = state.generation;
      load(slice).then((loaded) => {
        if (wanted === state.index && generation === state.generation) paint(slice, loaded);
      }, (error) => message(`This image cannot be shown (${error.message}).`));
    }
  }

  function paint(slice, entry) {
    if (state.center === null) [state.center, state.width] = defaultWindow(slice, entry);
    if (imageCanvas.width !== entry.columns || imageCanvas.height !== entry.rows || !imageData) {
      imageCanvas.width = entry.columns;
      imageCanvas.height = entry.rows;
      imageData = imageContext.createImageData(entry.columns, entry.rows);
    }
    if (entry.words) {
      const key = [state.center, state.width, state.invert, slice.slope, slice.intercept, slice.signed].join();
      if (key !== tableKey) {
        table = I.windowTable(slice, state.center, state.width, state.invert !== slice.invert);
        tableKey = key;
      }
      I.applyTable(entry.words, table, imageData.data);
    } else {
      I.applyColourWindow(entry.rgba, imageData.data, state.center, state.width, state.invert);
    }
    imageContext.putImageData(imageData, 0, 0);
    message(null);
    draw();
    api.paints++;
    api.losslessPaint = api.losslessPaint || performance.now();
    firstPainted();
  }

  /* The first slice is on screen: from the 8-bit preview or from the lossless rendition. */
  function firstPainted() {
    if (api.firstPaint === null) {
      api.firstPaint = performance.now();
      resolveFirst(api.firstPaint);
    }
  }

  function aspect() {
    const slice = state.slices[state.index];
    const s = slice && slice.pixel_spacing;
    return s && s[0] > 0 && s[1] > 0 ? s[0] / s[1] : 1; // row spacing over column spacing
  }

  function fitZoom() {
    const w = display.width, h = display.height;
    return Math.min(w / imageCanvas.width, h / (imageCanvas.height * aspect())) * 0.98;
  }

  function transform() {
    if (state.fitted) state.zoom = fitZoom();
    const sx = state.zoom, sy = state.zoom * aspect();
    const tx = display.width / 2 + state.panX - (imageCanvas.width * sx) / 2;
    const ty = display.height / 2 + state.panY - (imageCanvas.height * sy) / 2;
    return { sx, sy, tx, ty };
  }

  function imageToScreen(p) {
    const t = transform();
    return [(p[0] * t.sx + t.tx) / devicePixelRatio, (p[1] * t.sy + t.ty) / devicePixelRatio];
  }

  function screenToImage(x, y) {
    const t = transform();
    return [(x * devicePixelRatio - t.tx) / t.sx, (y * devicePixelRatio - t.ty) / t.sy];
  }

  function draw() {
    const t = transform();
    displayContext.setTransform(1, 0, 0, 1, 0, 0);
    displayContext.fillStyle = "#000";
    displayContext.fillRect(0, 0, display.width, display.height);
    displayContext.imageSmoothingEnabled = state.zoom < 4;
    displayContext.setTransform(t.sx, 0, 0, t.sy, t.tx, t.ty);
    displayContext.drawImage(imageCanvas, 0, 0);
    displayContext.setTransform(1, 0, 0, 1, 0, 0);
    const slice = state.slices[state.index];
    const lines = (state.measurements.get(keyOf(slice)) || []).concat(state.drawing ? [state.drawing] : []);
    for (const line of lines) drawMeasurement(line, slice);
    updateOverlay();
  }

  function measureText(line, slice) {
    const d = I.distance(line.p, line.q, slice.pixel_spacing);
    if (d.unit === "px") return `${d.value.toFixed(1)} px (no pixel spacing)`;
    if (slice.spacing_source === "ImagerPixelSpacing") return `≈${d.value.toFixed(1)} mm (at detector)`;
    return `${d.value.toFixed(1)} mm`;
  }

  function drawMeasurement(line, slice) {
    const [x1, y1] = imageToScreen(line.p).map((v) => v * devicePixelRatio);
    const [x2, y2] = imageToScreen(line.q).map((v) => v * devicePixelRatio);
    const c = displayContext;
    c.strokeStyle = "#ffd400";
    c.fillStyle = "#ffd400";
    c.lineWidth = 1.5 * devicePixelRatio;
    c.beginPath();
    c.moveTo(x1, y1);
    c.lineTo(x2, y2);
    c.stroke();
    for (const [x, y] of [[x1, y1], [x2, y2]]) c.fillRect(x - 2 * devicePixelRatio, y - 2 * devicePixelRatio, 4 * devicePixelRatio, 4 * devicePixelRatio);
    c.font = `${13 * devicePixelRatio}px system-ui, sans-serif`;
    c.fillText(measureText(line, slice), x2 + 6 * devicePixelRatio, y2 - 6 * devicePixelRatio);
  }

  function fmt(value, digits = 1) {
    return value === null || value === undefined ? "–" : String(Number(Number(value).toFixed(digits)));
  }

  function updateOverlay() {
    const slice = state.slices[state.index] || {};
    const series = data.series.find((s) => s.uid === state.series) || {};
    const n = state.slices.length;
    $("position").textContent = `Image ${n ? state.index + 1 : 0} / ${n}`;
    $("overlay-tl").innerText = [
      overlay.patient_name || "(no name)",
      `ID ${overlay.patient_id || "–"}`,
      `Born ${overlay.birth_date || "–"}  Sex ${overlay.sex || "–"}`,
    ].join("\n");
    $("overlay-tr").innerText = [
      overlay.study_date || "",
      overlay.study_description || "",
      `Se ${series.number ?? "–"}: ${series.description || ""}`,
    ].join("\n");
    const spacing = slice.pixel_spacing ? `${fmt(slice.pixel_spacing[0], 3)} × ${fmt(slice.pixel_spacing[1], 3)} mm${slice.spacing_source === "ImagerPixelSpacing" ? " (detector)" : ""}` : "–";
    $("overlay-bl").innerText = [
      `Image ${n ? state.index + 1 : 0} / ${n}${slice.frames > 1 ? `  (frame ${slice.frame})` : ""}`,
      `Thk ${fmt(slice.slice_thickness, 2)} mm  Loc ${fmt(slice.slice_location, 2)} mm`,
      `Spacing ${spacing}`,
    ].join("\n");
    $("overlay-br").innerText = [
      `WL ${fmt(state.center)}  WW ${fmt(state.width)}${state.invert ? "  inverted" : ""}`,
      `Zoom ${Math.round(state.zoom * 100)}%`,
    ].join("\n");
    const labels = I.orientationLabels(slice.orientation);
    for (const side of ["top", "bottom", "left", "right"]) $(`orient-${side}`).textContent = labels ? labels[side] : "";
  }

  function message(text) {
    $("message").hidden = !text;
    $("message").textContent = text || "";
  }

  function resize() {
    const rect = viewport.getBoundingClientRect();
    display.width = Math.max(1, Math.round(rect.width * devicePixelRatio));
    display.height = Math.max(1, Math.round(rect.height * devicePixelRatio));
    display.style.width = `${rect.width}px`;
    display.style.height = `${rect.height}px`;
    if (imageData) draw();
  }

  // ------------------------------------------------------------------ window, zoom, tools

  function setWindow(center, width) {
    state.center = center;
    state.width = Math.max(1, width);
    repaint();
  }

  function repaint() {
    const slice = state.slices[state.index];
    const entry = slice && cache.get(keyOf(slice));
    if (entry) paint(slice, entry);
  }

  function fillPresets() {
    const select = $("preset");
    const slice = state.slices[0] || {};
    const own = (slice.windows || []).map((w, i) => ({ name: w.name || `Image window ${i + 1}`, center: w.center, width: w.width }));
    const presets = own.concat(slice.colour ? [] : I.PRESETS);
    select.innerHTML = "";
    select.append(new Option("Window preset…", ""));
    presets.forEach((p, i) => select.append(new Option(`${i + 1}. ${p.name} (${fmt(p.center)}/${fmt(p.width)})`, `${p.center}/${p.width}`)));
    state.presets = presets;
  }

  function applyPreset(i) {
    const p = state.presets && state.presets[i];
    if (p) setWindow(p.center, p.width);
  }

  function zoomBy(factor, atX, atY) {
    const before = transform();
    const zoom = Math.max(0.05, Math.min(40, state.zoom * factor));
    if (atX !== undefined) {
      // keep the image point under the cursor where it is
      const px = (atX * devicePixelRatio - before.tx) / before.sx, py = (atY * devicePixelRatio - before.ty) / before.sy;
      state.fitted = false;
      state.zoom = zoom;
      const after = transform();
      state.panX += atX * devicePixelRatio - (px * after.sx + after.tx);
      state.panY += atY * devicePixelRatio - (py * after.sy + after.ty);
    } else {
      state.fitted = false;
      state.zoom = zoom;
    }
    draw();
  }

  function reset() {
    const slice = state.slices[state.index];
    const entry = slice && cache.get(keyOf(slice));
    state.invert = false;
    state.fitted = true;
    state.panX = state.panY = 0;
    if (entry) [state.center, state.width] = defaultWindow(slice, entry);
    repaint();
  }

  function setTool(tool) {
    state.tool = tool;
    for (const b of document.querySelectorAll("[data-tool]")) b.classList.toggle("active", b.dataset.tool === tool);
    viewport.dataset.tool = tool;
  }

  // cine
  let cineHandle = null, cineLast = 0;
  function cine(play) {
    state.playing = play === undefined ? !state.playing : play;
    $("cine").textContent = state.playing ? "❚❚ Pause" : "▶ Play";
    if (cineHandle) cancelAnimationFrame(cineHandle);
    cineHandle = null;
    if (!state.playing) return;
    const step = (now) => {
      const fps = Math.max(1, Math.min(60, Number($("fps").value) || 15));
      if (now - cineLast >= 1000 / fps) {
        cineLast = now;
        show((state.index + 1) % state.slices.length);
      }
      cineHandle = requestAnimationFrame(step);
    };
    cineHandle = requestAnimationFrame(step);
  }

  // ------------------------------------------------------------------ input

  let drag = null;
  viewport.addEventListener("contextmenu", (e) => e.preventDefault());
  viewport.addEventListener("pointerdown", (e) => {
    viewport.focus();
    const rect = viewport.getBoundingClientRect();
    const x = e.clientX - rect.left, y = e.clientY - rect.top;
    const tool = e.button === 1 ? "pan" : e.button === 2 ? "zoom" : state.tool;
    drag = { tool, x, y, lastX: x, lastY: y, index: state.index, center: state.center, width: state.width };
    if (tool === "measure") state.drawing = { p: screenToImage(x, y), q: screenToImage(x, y) };
    viewport.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  viewport.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const rect = viewport.getBoundingClientRect();
    const x = e.clientX - rect.left, y = e.clientY - rect.top;
    const dx = x - drag.lastX, dy = y - drag.lastY;
    drag.lastX = x;
    drag.lastY = y;
    if (drag.tool === "window") {
      const step = Math.max(drag.width, 10) / 250;
      setWindow(state.center + dy * step, state.width + dx * step);
    } else if (drag.tool === "pan") {
      state.panX += dx * devicePixelRatio;
      state.panY += dy * devicePixelRatio;
      draw();
    } else if (drag.tool === "zoom") {
      zoomBy(Math.exp(-dy / 150));
    } else if (drag.tool === "scroll") {
      show(drag.index + Math.round((y - drag.y) / 6));
    } else if (drag.tool === "measure") {
      state.drawing.q = screenToImage(x, y);
      draw();
    }
  });
  const endDrag = () => {
    if (drag && drag.tool === "measure" && state.drawing) {
      const line = state.drawing;
      if (Math.hypot(line.q[0] - line.p[0], line.q[1] - line.p[1]) > 0.5) {
        const key = keyOf(state.slices[state.index]);
        state.measurements.set(key, (state.measurements.get(key) || []).concat([line]));
      }
      state.drawing = null;
      draw();
    }
    drag = null;
  };
  viewport.addEventListener("pointerup", endDrag);
  viewport.addEventListener("pointercancel", endDrag);

  let wheelRest = 0;
  viewport.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (e.ctrlKey || e.metaKey) {
      const rect = viewport.getBoundingClientRect();
      zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - rect.left, e.clientY - rect.top);
      return;
    }
    // trackpads send many small deltas: one slice per 50 units, a mouse notch at least one
    wheelRest += e.deltaMode === 1 ? e.deltaY * 33 : e.deltaY;
    const steps = Math.trunc(wheelRest / 50) || (Math.abs(e.deltaY) >= 50 ? Math.sign(e.deltaY) : 0);
    if (steps) {
      wheelRest = 0;
      show(state.index + steps);
    }
  }, { passive: false });

  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
    if ($("help-panel").open && e.key !== "Escape") return;
    const keys = {
      ArrowUp: () => show(state.index - 1), ArrowLeft: () => show(state.index - 1),
      ArrowDown: () => show(state.index + 1), ArrowRight: () => show(state.index + 1),
      PageUp: () => show(state.index - 10), PageDown: () => show(state.index + 10),
      Home: () => show(0), End: () => show(state.slices.length - 1),
      " ": () => cine(), w: () => setTool("window"), p: () => setTool("pan"), z: () => setTool("zoom"),
      s: () => setTool("scroll"), m: () => setTool("measure"), i: () => { state.invert = !state.invert; repaint(); },
      r: reset, f: () => { state.fitted = true; state.panX = state.panY = 0; draw(); },
      o: () => { state.fitted = false; state.zoom = 1; draw(); }, "+": () => zoomBy(1.25), "=": () => zoomBy(1.25),
      "-": () => zoomBy(0.8), c: () => { state.measurements.clear(); draw(); },
      h: () => $("help-panel").showModal(), "?": () => $("help-panel").showModal(),
      Escape: () => { state.drawing = null; if ($("help-panel").open) $("help-panel").close(); draw(); },
    };
    const action = keys[e.key] || keys[e.key.toLowerCase()];
    if (/^[1-9]$/.test(e.key)) {
      applyPreset(Number(e.key) - 1);
    } else if (action && !e.ctrlKey && !e.metaKey && !e.altKey) {
      action();
    } else {
      return;
    }
    e.preventDefault();
  });

  slider.addEventListener("input", () => show(Number(slider.value) - 1));
  for (const b of document.querySelectorAll("[data-tool]")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("preset").addEventListener("change", (e) => { if (e.target.value) applyPreset(e.target.selectedIndex - 1); viewport.focus(); });
  $("invert").addEventListener("click", () => { state.invert = !state.invert; repaint(); });
  $("reset").addEventListener("click", reset);
  $("zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("fit").addEventListener("click", () => { state.fitted = true; state.panX = state.panY = 0; draw(); });
  $("one-to-one").addEventListener("click", () => { state.fitted = false; state.zoom = 1; draw(); });
  $("cine").addEventListener("click", () => cine());
  $("clear").addEventListener("click", () => { state.measurements.clear(); draw(); });
  $("help").addEventListener("click", () => $("help-panel").showModal());
  for (const item of document.querySelectorAll(".strip-item")) {
    item.addEventListener("click", () => {
      if (item.dataset.series !== state.series) loadSeries(item.dataset.series).catch((err) => message(`The series cannot be loaded (${err.message}).`));
    });
  }
  new ResizeObserver(resize).observe(viewport);

  // ------------------------------------------------------------------ start

  function start() {
    cine(false);
    slider.max = Math.max(1, state.slices.length);
    fillPresets();
    resize();
    if (!state.slices.length) {
      message("This series holds no image.");
      return;
    }
    const first = state.slices[0];
    const generation = state.generation;
    // The 8-bit preview paints at once while the lossless rendition loads.
    if (!cache.has(keyOf(first))) {
      const preview = new Image();
      preview.onload = () => {
        if (generation !== state.generation || cache.has(keyOf(first))) return;
        imageCanvas.width = preview.naturalWidth;
        imageCanvas.height = preview.naturalHeight;
        imageData = null;
        imageContext.drawImage(preview, 0, 0);
        draw();
        firstPainted();
      };
      preview.src = urlOf(first, "preview");
    }
    load(first).then((entry) => {
      if (generation !== state.generation) return;
      if (state.index === 0) paint(first, entry);
      prefetch();
    }, (error) => { message(`This image cannot be shown (${error.message}).`); prefetch(); });
    updateOverlay();
  }

  viewport.focus();
  performance.mark("viewer-start");
  start();
  performance.mark("viewer-started");
})();
