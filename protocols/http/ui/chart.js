// A telemetry chart in SVG: one line per numeric field of the samples' Data, time across.
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f6feb", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989"];

function el(name, attrs = {}) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

export function numericSeries(samples) {
  const series = new Map();
  for (const sample of samples) {
    for (const [field, value] of Object.entries(sample.Data || {})) {
      if (typeof value !== "number" || !Number.isFinite(value)) continue;
      if (!series.has(field)) series.set(field, []);
      series.get(field).push([sample.Time, value]);
    }
  }
  return series;
}

export function drawChart(samples, title) {
  const width = 640, height = 220, pad = 36;
  const svg = el("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  const series = numericSeries(samples);
  const points = [...series.values()].flat();
  const legend = document.createElement("div");
  legend.className = "legend";
  if (!points.length) {
    const text = el("text", { x: pad, y: height / 2 });
    text.textContent = "no numeric samples in this window";
    svg.append(text);
    return { svg, legend };
  }
  const times = points.map((p) => p[0]), values = points.map((p) => p[1]);
  let [t0, t1] = [Math.min(...times), Math.max(...times)];
  let [v0, v1] = [Math.min(...values), Math.max(...values)];
  if (t1 === t0) t1 = t0 + 1;
  if (v1 === v0) { v0 -= 1; v1 += 1; }
  const x = (t) => pad + ((t - t0) / (t1 - t0)) * (width - 2 * pad);
  const y = (v) => height - pad + -((v - v0) / (v1 - v0)) * (height - 2 * pad);
  svg.append(el("line", { class: "axis", x1: pad, y1: height - pad, x2: width - pad, y2: height - pad }));
  svg.append(el("line", { class: "axis", x1: pad, y1: pad, x2: pad, y2: height - pad }));
  const labels = [[v1.toPrecision(4), pad - 4, pad + 4, "end"], [v0.toPrecision(4), pad - 4, height - pad, "end"],
    [new Date(t0 * 1000).toLocaleTimeString(), pad, height - pad + 16, "start"],
    [new Date(t1 * 1000).toLocaleTimeString(), width - pad, height - pad + 16, "end"]];
  for (const [text, lx, ly, anchor] of labels) {
    const node = el("text", { x: lx, y: ly, "text-anchor": anchor });
    node.textContent = text;
    svg.append(node);
  }
  let i = 0;
  for (const [field, data] of series) {
    const colour = COLOURS[i++ % COLOURS.length];
    const line = el("polyline", { stroke: colour, "data-field": field,
      points: data.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ") });
    svg.append(line);
    for (const [t, v] of data) svg.append(el("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2, fill: colour, class: "point" }));
    const key = document.createElement("span");
    key.style.color = colour;
    key.textContent = `● ${field} (${data.length})`;
    legend.append(key);
  }
  return { svg, legend };
}
