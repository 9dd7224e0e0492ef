/* Pure image functions of the viewer: windowing, orientation, distances. No DOM here.
 *
 * Windowing follows DICOM PS3.3 C.11.2.1.2.1 (the LINEAR VOI function), applied to the
 * modality values (stored value x RescaleSlope + RescaleIntercept, C.11.1) that the packed PNG
 * carries losslessly: each pixel's 16 stored bits are red (high byte) and green (low byte).
 * The server's 8-bit preview uses the same formula (archive/render.py, window_linear).
 */
"use strict";

(function (global) {
  const PRESETS = [
    { name: "CT soft tissue", center: 40, width: 400 },
    { name: "CT lung", center: -600, width: 1500 },
    { name: "CT bone", center: 400, width: 1800 },
    { name: "CT brain", center: 40, width: 80 },
    { name: "CT liver", center: 60, width: 160 },
    { name: "CT mediastinum", center: 50, width: 350 },
  ];

  /* One display value (0..255) for a modality value, LINEAR VOI. */
  function windowValue(value, center, width) {
    width = Math.max(width, 1);
    const low = center - 0.5 - (width - 1) / 2;
    const high = center - 0.5 + (width - 1) / 2;
    if (value <= low) return 0;
    if (value > high) return 255;
    const scaled = ((value - (center - 0.5)) / (width > 1 ? width - 1 : 1) + 0.5) * 255;
    return Math.min(255, Math.max(0, Math.round(scaled)));
  }

  /* The stored value a packed 16-bit word stands for. */
  function storedValue(word, signed) {
    return signed && word >= 32768 ? word - 65536 : word;
  }

  /* A table from every packed word (0..65535) to a display value, for one window. */
  function windowTable(slice, center, width, invert) {
    const table = new Uint8Array(65536);
    const slope = slice.slope, intercept = slice.intercept, signed = slice.signed;
    const w = Math.max(width, 1);
    const low = center - 0.5 - (w - 1) / 2, high = center - 0.5 + (w - 1) / 2;
    const divisor = w > 1 ? w - 1 : 1, mid = center - 0.5;
    for (let word = 0; word < 65536; word++) {
      const value = storedValue(word, signed) * slope + intercept;
      let out;
      if (value <= low) out = 0;
      else if (value > high) out = 255;
      else out = Math.min(255, Math.max(0, Math.round(((value - mid) / divisor + 0.5) * 255)));
      table[word] = invert ? 255 - out : out;
    }
    return table;
  }

  /* Words (Uint16Array) through a table into RGBA pixels (Uint8ClampedArray). */
  function applyTable(words, table, rgba) {
    const out32 = new Uint32Array(rgba.buffer, rgba.byteOffset, words.length);
    const little = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
    for (let i = 0; i < words.length; i++) {
      const v = table[words[i]];
      out32[i] = little ? (0xff000000 | (v << 16) | (v << 8) | v) >>> 0 : ((v << 24) | (v << 16) | (v << 8) | 0xff) >>> 0;
    }
  }

  /* Colour images: the same window on each channel (values 0..255). */
  function applyColourWindow(rgbaIn, rgbaOut, center, width, invert) {
    const table = new Uint8Array(256);
    for (let v = 0; v < 256; v++) {
      const out = windowValue(v, center, width);
      table[v] = invert ? 255 - out : out;
    }
    for (let i = 0; i < rgbaIn.length; i += 4) {
      rgbaOut[i] = table[rgbaIn[i]];
      rgbaOut[i + 1] = table[rgbaIn[i + 1]];
      rgbaOut[i + 2] = table[rgbaIn[i + 2]];
      rgbaOut[i + 3] = 255;
    }
  }

  /* RGBA pixels of a packed PNG to its 16-bit words. */
  function unpack(rgba, count) {
    const words = new Uint16Array(count);
    for (let i = 0, j = 0; i < count; i++, j += 4) words[i] = (rgba[j] << 8) | rgba[j + 1];
    return words;
  }

  /* Smallest and largest modality value of a slice's words. */
  function valueRange(words, slice) {
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < words.length; i++) {
      const v = storedValue(words[i], slice.signed);
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const a = lo * slice.slope + slice.intercept, b = hi * slice.slope + slice.intercept;
    return [Math.min(a, b), Math.max(a, b)];
  }

  /* Patient-direction letters of a direction cosine vector (PS3.3 C.7.6.1.1.1):
   * x: L (+) / R (-), y: P (+) / A (-), z: H (+) / F (-); strongest component first. */
  function directionLetters(v) {
    const axes = [
      [Math.abs(v[0]), v[0] > 0 ? "L" : "R"],
      [Math.abs(v[1]), v[1] > 0 ? "P" : "A"],
      [Math.abs(v[2]), v[2] > 0 ? "H" : "F"],
    ].sort((a, b) => b[0] - a[0]);
    return axes.filter((a) => a[0] > 0.25).map((a) => a[1]).join("");
  }

  /* The letters at the four edges of an image with this ImageOrientationPatient. */
  function orientationLabels(orientation) {
    if (!orientation || orientation.length !== 6) return null;
    const row = orientation.slice(0, 3), column = orientation.slice(3, 6);
    const neg = (v) => v.map((x) => -x);
    return {
      right: directionLetters(row),
      left: directionLetters(neg(row)),
      bottom: directionLetters(column),
      top: directionLetters(neg(column)),
    };
  }

  /* Distance in mm between two image points [column, row], PixelSpacing = [row, column]. */
  function distance(p, q, spacing) {
    const dx = q[0] - p[0], dy = q[1] - p[1];
    if (!spacing) return { value: Math.hypot(dx, dy), unit: "px" };
    return { value: Math.hypot(dx * spacing[1], dy * spacing[0]), unit: "mm" };
  }

  global.PacsImaging = {
    PRESETS, windowValue, storedValue, windowTable, applyTable, applyColourWindow, unpack, valueRange,
    directionLetters, orientationLabels, distance,
  };
})(window);
