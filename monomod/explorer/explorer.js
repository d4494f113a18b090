/* The partition explorer (monomod/explorer/page.py inlines this file; no library, no network).
 *
 * The page data holds every fx node as columns, the layout Python computed (x in node slots, layer), the legal cut
 * points with their --cuts names, and the partition's cuts as node positions. What is drawn is the graph seen at
 * the current collapse level: a collapsed module path is one box. The cut rule below is a port of
 * passes/partition.py's _build_partition, so moving a cut gives the figures `monomod inspect --cuts` prints.
 */
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("monomod-data").textContent);
  const C = D.nodes, N = C.name.length, REMAT = 1, COMPUTE = 2, DRAWN = 4;
  const NW = 150, NH = 26, GW = 190, XS = 172, YS = 50;
  const FILL = ["#dbe7f6", "#fde2c8", "#d9efd6", "#f8d5d5", "#d6eeec", "#fbf0c4", "#eadcf0", "#ffe0e5", "#e9ddd3",
    "#e6e4e2", "#d5ecea", "#f3d8e6"];
  const EDGE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#c9a800", "#b07aa1", "#e8748a", "#9c755f",
    "#8f8782", "#5e9e98", "#d37295"];
  const $ = (sel) => document.querySelector(sel);
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };

  // ------------------------------------------------------------------------------------------- static facts
  const inputs = D.inputs;
  const users = Array.from({ length: N }, () => []);
  inputs.forEach((ins, i) => ins.forEach((u) => users[u].push(i)));
  const pathOf = (i) => C.paths[C.path[i]];
  const isDrawn = (i) => (C.kind[i] & DRAWN) !== 0;
  const isRemat = (i) => (C.kind[i] & REMAT) !== 0;
  const DRAWN_TOTAL = C.kind.filter((k) => k & DRAWN).length;
  const legal = [];
  for (let i = 0; i < N; i++) if (C.cut[i]) legal.push(i);
  const drawnCount = new Map();  // module path prefix -> drawn nodes under it
  for (let i = 0; i < N; i++) if (isDrawn(i)) for (const p of prefixes(pathOf(i))) drawnCount.set(p, (drawnCount.get(p) || 0) + 1);

  function prefixes(path) {
    if (!path) return [];
    const parts = path.split("."), out = [];
    for (let n = 1; n <= parts.length; n++) out.push(parts.slice(0, n).join("."));
    return out;
  }
  const within = (path, group) => path === group || path.startsWith(group + ".");

  // ------------------------------------------------------------------------------------------ formatting
  const g3 = (x) => String(parseFloat(x.toPrecision(3)));
  function human(n, unit) {
    for (const [f, p] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) if (Math.abs(n) >= f) return g3(n / f) + p + (unit || "");
    return g3(n) + (unit || "");
  }
  function humanBytes(n) {
    for (const [f, p] of [[2 ** 30, "GiB"], [2 ** 20, "MiB"], [2 ** 10, "KiB"]]) if (n >= f) return g3(n / f) + " " + p;
    return Math.trunc(n) + " B";
  }
  const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%");

  // ------------------------------------------------------------------------- the cut rule (as --cuts does it)
  function assignmentOf(cuts) {
    const asg = new Int32Array(N);
    let m = 0;
    for (let i = 0; i < N; i++) {
      while (m < cuts.length && cuts[m] <= i) m++;
      asg[i] = m;
    }
    return asg;
  }

  /* passes/partition.py _build_partition: members, values recomputed in a module, values it needs from earlier
   * modules; per module FLOPs and params over members and recomputed nodes; per cut the values crossing it. */
  function figuresFor(cuts) {
    const k = cuts.length + 1, asg = assignmentOf(cuts);
    const member = new Int32Array(N).fill(-1), lists = Array.from({ length: k }, () => []);
    for (let i = 0; i < N; i++) if (!isRemat(i) || users[i].length === 0) { member[i] = asg[i]; lists[asg[i]].push(i); }
    const needs = [], exportsOf = Array.from({ length: k }, () => new Set()), recomputed = [];
    for (let j = k - 1; j >= 0; j--) {
      const direct = new Set(), rec = new Set(), need = new Set(), memo = new Map();
      for (const m of lists[j]) for (const u of inputs[m]) if (member[u] !== j && !isRemat(u)) direct.add(u);
      const local = (u) => {
        if (member[u] === j || direct.has(u)) return true;
        if (!isRemat(u)) return false;
        if (!memo.has(u)) memo.set(u, inputs[u].every(local));
        return memo.get(u);
      };
      const resolve = (u) => {
        if (member[u] === j || rec.has(u)) return;
        if (isRemat(u) && (asg[u] === j || local(u))) { rec.add(u); inputs[u].forEach(resolve); } else need.add(u);
      };
      for (const root of lists[j]) inputs[root].forEach(resolve);
      for (const root of exportsOf[j]) {
        if (member[root] !== j) resolve(root);
        inputs[root].forEach(resolve);
      }
      for (const u of need) exportsOf[asg[u]].add(u);
      needs[j] = need; recomputed[j] = rec;
    }
    const flops = [], params = [];
    for (let j = 0; j < k; j++) {
      let f = 0, p = 0;
      const local = new Set(lists[j]);
      recomputed[j].forEach((u) => local.add(u));
      local.forEach((u) => { f += C.flops[u]; p += C.params[u]; });
      flops.push(f); params.push(p);
    }
    const boundaries = [];
    for (let b = 0; b < k - 1; b++) {
      const crossing = new Set();
      for (let j = b + 1; j < k; j++) needs[j].forEach((u) => { if (asg[u] <= b) crossing.add(u); });
      boundaries.push([...crossing].sort((a, c) => a - c));
    }
    const cutBytes = boundaries.map((vs) => vs.reduce((s, u) => s + C.bytes[u], 0));
    const costs = D.cost === "flops" ? flops : params;
    const mean = costs.reduce((a, b) => a + b, 0) / k;
    return {
      flops, params, costs, asg, boundaries, cut_bytes: cutBytes, nodes: lists.map((l) => l.length),
      bytes_cut: cutBytes.reduce((a, b) => a + b, 0),
      balance: mean ? Math.max(...costs) / mean : 1.0,
      cuts_arg: cuts.map((c) => C.cut[c]).join(","),
    };
  }

  // --------------------------------------------------------------------------------------------- state
  const S = {
    cuts: D.cuts.slice(), collapsed: new Set(D.collapsed), selected: -1, hoverItem: null, matches: [],
    matchCursor: -1, colour: "module", view: { s: 1, tx: 0, ty: 0 }, fig: null, items: [], edges: [], frames: [],
    itemOf: new Int32Array(N).fill(-1), bounds: null, bands: [], drag: null,
  };

  // ------------------------------------------------------------------------- the graph at this collapse level
  function ownerGroup(i) {
    for (const p of prefixes(pathOf(i))) if (S.collapsed.has(p) && drawnCount.get(p) > 1) return p;
    return null;
  }

  function build() {
    const items = [], groups = new Map(), itemOf = S.itemOf.fill(-1);
    for (let i = 0; i < N; i++) {
      if (!isDrawn(i)) continue;
      const g = ownerGroup(i);
      let item = g === null ? null : groups.get(g);
      if (!item) {
        item = { id: items.length, node: g === null ? i : -1, path: g === null ? pathOf(i) : g, members: [] };
        items.push(item);
        if (g !== null) groups.set(g, item);
      }
      item.members.push(i);
      itemOf[i] = item.id;
    }
    placeItems(items);
    S.items = items;
    S.edges = buildEdges(items, itemOf);
    S.frames = buildFrames(items);
    S.bounds = boundsOf(items);
  }

  /* Python laid out every node; a collapsed group takes the row of its first layer and the mean x of its members,
   * and rows that only collapsed groups span disappear, so collapsing shortens the picture. */
  function placeItems(items) {
    const rows = new Set();
    for (const it of items) {
      let lo = Infinity, x = 0;
      for (const i of it.members) { lo = Math.min(lo, C.layer[i]); x += C.x[i]; }
      it.layer = lo; it.x = (x / it.members.length) * XS; it.w = it.node >= 0 ? NW : GW;
      rows.add(lo);
    }
    const rowOf = new Map([...rows].sort((a, b) => a - b).map((r, n) => [r, n]));
    for (const it of items) it.y = rowOf.get(it.layer) * YS;
  }

  function buildEdges(items, itemOf) {
    const seen = new Map();
    for (const it of items) for (const i of it.members) for (const u of inputs[i]) {
      const a = itemOf[u];
      if (a < 0 || a === it.id) continue;
      const key = a * items.length + it.id;
      if (!seen.has(key)) seen.set(key, { a, b: it.id, from: u, to: i });
    }
    return [...seen.values()];
  }

  /* A frame around the visible items of every expanded module path: its header collapses the path again. */
  function buildFrames(items) {
    const boxes = new Map();
    for (const it of items) {
      const path = it.node >= 0 ? it.path : it.path.split(".").slice(0, -1).join(".");
      for (const p of prefixes(path)) {
        if (drawnCount.get(p) < 2) continue;
        const b = boxes.get(p) || { path: p, x0: Infinity, y0: Infinity, x1: -Infinity, y1: -Infinity, n: 0 };
        b.x0 = Math.min(b.x0, it.x - it.w / 2); b.x1 = Math.max(b.x1, it.x + it.w / 2);
        b.y0 = Math.min(b.y0, it.y - NH / 2); b.y1 = Math.max(b.y1, it.y + NH / 2); b.n++;
        boxes.set(p, b);
      }
    }
    const frames = [...boxes.values()].filter((b) => b.n > 1);
    const depth = (b) => b.path.split(".").length, deepest = Math.max(0, ...frames.map(depth));
    return frames.map((b) => {
      const d = 6 * (deepest - depth(b));  // outer frames wider, so nested ones stay inside
      return { ...b, x0: b.x0 - 14 - d, x1: b.x1 + 14 + d, y0: b.y0 - 16 - d, y1: b.y1 + 6 + d };
    }).sort((a, b) => depth(a) - depth(b));
  }

  function boundsOf(items) {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const it of items) {
      x0 = Math.min(x0, it.x - it.w / 2); x1 = Math.max(x1, it.x + it.w / 2);
      y0 = Math.min(y0, it.y - NH / 2); y1 = Math.max(y1, it.y + NH / 2);
    }
    return { x0: x0 - 260, x1: x1 + 40, y0: y0 - 30, y1: y1 + 30 };
  }

  // --------------------------------------------------------------------------------- modules, bands, cuts
  /* The module a node is drawn in: its own, except that a parameter read or shape arithmetic shows with its first
   * user, the module that recomputes it (by position it may sit just before a cut). */
  function drawnModules(asg) {
    const vis = new Int32Array(N);
    for (let i = N - 1; i >= 0; i--) vis[i] = isRemat(i) && users[i].length ? vis[Math.min(...users[i])] : asg[i];
    return vis;
  }

  function recompute() {
    S.fig = figuresFor(S.cuts);
    S.vis = drawnModules(S.fig.asg);
    const k = S.cuts.length + 1, bands = Array.from({ length: k }, () => ({ y0: Infinity, y1: -Infinity }));
    for (const it of S.items) for (const i of it.members) {
      const b = bands[S.vis[i]];
      b.y0 = Math.min(b.y0, it.y); b.y1 = Math.max(b.y1, it.y);
    }
    S.bands = bands;
    S.cutY = S.cuts.map((c, b) => {
      const above = bands[b].y1, below = bands[b + 1].y0;
      return below > above ? (above + below) / 2 : itemOfNode(c).y;
    });
  }

  function firstDrawnFrom(i) {
    for (let n = i; n < N; n++) if (isDrawn(n)) return n;
    for (let n = i; n >= 0; n--) if (isDrawn(n)) return n;
    return 0;
  }

  const itemOfNode = (i) => S.items[S.itemOf[firstDrawnFrom(i)]];

  /* Cut b may sit strictly between its neighbours (the graph's ends for the first and last). */
  const room = (b) => [b > 0 ? S.cuts[b - 1] : 0, b < S.cuts.length - 1 ? S.cuts[b + 1] : N];

  /* The next legal point in direction dir whose box differs from the cut's current one (a collapsed block is one
   * step), taking the first legal node of that box: where its module path begins. */
  function stepCut(b, dir) {
    const [lo, hi] = room(b);
    const here = itemOfNode(S.cuts[b]).id;
    const cands = legal.filter((p) => p > lo && p < hi);
    let target = -1;
    if (dir > 0) target = cands.find((p) => p > S.cuts[b] && itemOfNode(p).id !== here) ?? -1;
    else {
      const before = cands.filter((p) => p < S.cuts[b] && itemOfNode(p).id !== here);
      if (before.length) {
        const box = itemOfNode(before[before.length - 1]).id;
        target = before.find((p) => itemOfNode(p).id === box);
      }
    }
    if (target >= 0) moveCut(b, target);
  }

  function moveCut(b, position) {
    const [lo, hi] = room(b);
    if (!(position > lo && position < hi) || !C.cut[position]) return false;
    S.cuts[b] = position;
    refresh();
    return true;
  }

  /* While dragging cut b: the legal point between its neighbours whose box is nearest the pointer. */
  function nearestCutPoint(b, worldY) {
    const [lo, hi] = room(b);
    let best = -1, bestD = Infinity;
    for (const p of legal) {
      if (p <= lo || p >= hi) continue;
      const d = Math.abs(itemOfNode(p).y - YS / 2 - worldY);
      if (d < bestD) { best = p; bestD = d; }
    }
    return best;
  }

  // ------------------------------------------------------------------------------------------- drawing
  const canvas = el("canvas", { id: "graph" }), mini = el("canvas", { id: "minimap" });
  let ctx, mctx, miniCache = null;

  function colourOf(i) {
    if (S.colour === "module") return FILL[S.vis[i] % FILL.length];
    const values = C[S.colour], max = S.maxOf[S.colour] || 1;
    const t = values[i] > 0 ? Math.log1p(values[i]) / Math.log1p(max) : 0;
    return `hsl(${210 - 190 * t}, 75%, ${92 - 40 * t}%)`;
  }

  function draw() {
    const { s, tx, ty } = S.view, w = canvas.clientWidth, h = canvas.clientHeight, dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.setTransform(dpr * s, 0, 0, dpr * s, dpr * tx, dpr * ty);
    const view = { x0: -tx / s, y0: -ty / s, x1: (w - tx) / s, y1: (h - ty) / s };
    drawBands(view);
    drawFrames(view, s);
    drawEdges(view, s);
    drawItems(view, s);
    drawCuts(view, s);
    drawMinimap();
  }

  function drawBands(view) {
    S.bands.forEach((b, j) => {
      if (b.y1 < b.y0) return;
      ctx.fillStyle = FILL[j % FILL.length];
      ctx.globalAlpha = 0.35;
      ctx.fillRect(view.x0, b.y0 - YS / 2 + 3, view.x1 - view.x0, b.y1 - b.y0 + YS - 6);
      ctx.globalAlpha = 1;
      ctx.fillStyle = EDGE[j % EDGE.length];
      ctx.font = "bold 13px system-ui, sans-serif";
      ctx.fillText(`module ${j}`, S.bounds.x0 + 214, b.y0 - YS / 2 + 18);
    });
  }

  function drawFrames(view, s) {
    ctx.lineWidth = 1 / Math.max(s, 0.3);
    for (const f of S.frames) {
      if (f.x1 < view.x0 || f.x0 > view.x1 || f.y1 < view.y0 || f.y0 > view.y1) continue;
      ctx.strokeStyle = "#9aa6b8";
      ctx.setLineDash([4, 3]);
      ctx.strokeRect(f.x0, f.y0, f.x1 - f.x0, f.y1 - f.y0);
      ctx.setLineDash([]);
      if (s > 0.35) {
        ctx.fillStyle = "#5b6475"; ctx.font = "11px system-ui, sans-serif";
        ctx.fillText("▾ " + f.path, f.x0 + 4, f.y0 + 11);
      }
    }
  }

  function drawEdges(view, s) {
    for (const e of S.edges) {
      const a = S.items[e.a], b = S.items[e.b];
      if (Math.max(a.y, b.y) < view.y0 - YS || Math.min(a.y, b.y) > view.y1 + YS) continue;
      const cross = S.vis[e.from] !== S.vis[e.to];
      const lit = S.selected >= 0 && (e.from === S.selected || e.to === S.selected);
      ctx.strokeStyle = cross ? "#c0392b" : lit ? "#2f6fde" : "#8792a6";
      ctx.lineWidth = (cross || lit ? 2.2 : 1) / Math.max(s, 0.4);
      const y0 = a.y + NH / 2, y1 = b.y - NH / 2, dy = Math.max(20, (y1 - y0) / 2);
      // A long edge (a residual) bows out to the side instead of running over the column it skips.
      const bow = y1 - y0 > 3 * YS && Math.abs(a.x - b.x) < NW ? Math.min(NW, (y1 - y0) / 5) : 0;
      ctx.beginPath();
      ctx.moveTo(a.x, y0);
      if (bow) ctx.bezierCurveTo(a.x - bow * 1.4, y0 + YS, b.x - bow * 1.4, y1 - YS, b.x, y1);
      else if (y1 > y0) ctx.bezierCurveTo(a.x, y0 + dy, b.x, y1 - dy, b.x, y1);
      else ctx.bezierCurveTo(a.x + 120, y0 + 60, b.x + 120, y1 - 60, b.x, y1);
      ctx.stroke();
    }
  }

  function drawItems(view, s) {
    const hits = new Set(S.matches.map((i) => S.itemOf[i]).filter((id) => id >= 0));
    const text = s > 0.45;
    ctx.font = "11px system-ui, sans-serif";
    for (const it of S.items) {
      if (it.x + it.w / 2 < view.x0 || it.x - it.w / 2 > view.x1 || it.y + NH < view.y0 || it.y - NH > view.y1) continue;
      drawBox(it);
      const sel = S.selected >= 0 && S.itemOf[S.selected] === it.id;
      if (hits.has(it.id) || sel || S.hoverItem === it) {
        ctx.strokeStyle = sel ? "#2f6fde" : hits.has(it.id) ? "#ff8c00" : "#1d2433";
        ctx.lineWidth = 3 / Math.max(s, 0.3);
        ctx.strokeRect(it.x - it.w / 2 - 2, it.y - NH / 2 - 2, it.w + 4, NH + 4);
      }
      if (text) drawLabel(it);
    }
  }

  /* A box split into one stripe per module it holds (a collapsed group with a cut inside shows both colours). */
  function drawBox(it) {
    const x = it.x - it.w / 2, y = it.y - NH / 2;
    const parts = new Map();
    for (const i of it.members) parts.set(colourOf(i), (parts.get(colourOf(i)) || 0) + 1);
    let at = x;
    for (const [fill, n] of parts) {
      const w = (it.w * n) / it.members.length;
      ctx.fillStyle = fill;
      ctx.fillRect(at, y, w, NH);
      at += w;
    }
    ctx.strokeStyle = it.node >= 0 ? "#6b778c" : "#1d2433";
    ctx.lineWidth = it.node >= 0 ? 1 : 2;
    ctx.strokeRect(x, y, it.w, NH);
  }

  function drawLabel(it) {
    ctx.fillStyle = "#1d2433";
    let label;
    if (it.node >= 0) {
      const i = it.node, t = C.op[i] === "call_module" ? C.target[i].split(".").pop() : C.op[i].startsWith("call_") ? C.target[i] : C.op[i];
      label = `${t}  ${C.shape[i]}`;
    } else label = `▸ ${it.path}  (${it.members.length})`;
    ctx.fillText(clip(label, it.w - 8), it.x - it.w / 2 + 5, it.y + 4);
  }

  function clip(text, width) {
    if (ctx.measureText(text).width <= width) return text;
    let n = text.length;
    while (n > 1 && ctx.measureText(text.slice(0, n) + "…").width > width) n--;
    return text.slice(0, n) + "…";
  }

  function drawCuts(view, s) {
    const fig = S.fig, x0 = S.bounds.x0;
    S.cutY.forEach((y, b) => {
      const dragging = S.drag && S.drag.cut === b;
      ctx.strokeStyle = "#c0392b";
      ctx.lineWidth = (dragging ? 3 : 2) / Math.max(s, 0.4);
      ctx.setLineDash([8, 5]);
      ctx.beginPath(); ctx.moveTo(x0, y); ctx.lineTo(view.x1, y); ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "#c0392b";
      roundRect(x0 + 4, y - 11, 200, 22);
      ctx.fillStyle = "#fff"; ctx.font = "bold 11px system-ui, sans-serif";
      ctx.fillText(clip(`✂ ${C.cut[S.cuts[b]]} · ${humanBytes(fig.cut_bytes[b])}`, 190), x0 + 10, y + 4);
      if (s > 0.35) drawCutValues(b, y);
    });
  }

  /* Each value crossing cut b, labelled once: its name, shape and bytes, next to the box that produces it. */
  function drawCutValues(b, y) {
    ctx.font = "10px system-ui, sans-serif";
    ctx.fillStyle = "#8e2a1f";
    const shown = S.fig.boundaries[b].slice(0, 6);
    shown.forEach((u, n) => {
      const it = itemOfNode(u);
      ctx.fillText(`${C.name[u]}: ${C.shape[u]} · ${humanBytes(C.bytes[u])}`, it.x + it.w / 2 + 8, y - 4 - 12 * n);
    });
    const more = S.fig.boundaries[b].length - shown.length;
    if (more > 0) ctx.fillText(`+${more} more`, itemOfNode(shown[0]).x + 60, y - 4 - 12 * shown.length);
  }

  function roundRect(x, y, w, h) {
    ctx.beginPath();
    ctx.moveTo(x + 5, y); ctx.arcTo(x + w, y, x + w, y + h, 5); ctx.arcTo(x + w, y + h, x, y + h, 5);
    ctx.arcTo(x, y + h, x, y, 5); ctx.arcTo(x, y, x + w, y, 5); ctx.fill();
  }

  function minimapScale() {
    const b = S.bounds, w = mini.clientWidth, h = mini.clientHeight;
    const k = Math.min(w / (b.x1 - b.x0), h / (b.y1 - b.y0));
    return { k, ox: (w - k * (b.x1 - b.x0)) / 2 - k * b.x0, oy: (h - k * (b.y1 - b.y0)) / 2 - k * b.y0 };
  }

  function drawMinimap() {
    const w = mini.clientWidth, h = mini.clientHeight, dpr = window.devicePixelRatio || 1;
    if (!miniCache) {
      miniCache = document.createElement("canvas");
      miniCache.width = w * dpr; miniCache.height = h * dpr;
      const c = miniCache.getContext("2d"), m = minimapScale();
      c.setTransform(dpr, 0, 0, dpr, 0, 0);
      for (const it of S.items) {
        c.fillStyle = EDGE[S.vis[it.members[0]] % EDGE.length];
        c.fillRect(m.ox + m.k * (it.x - it.w / 2), m.oy + m.k * (it.y - NH / 2), Math.max(1, m.k * it.w), Math.max(1, m.k * NH));
      }
    }
    mini.width = w * dpr; mini.height = h * dpr;
    mctx.setTransform(1, 0, 0, 1, 0, 0);
    mctx.drawImage(miniCache, 0, 0);
    const m = minimapScale(), { s, tx, ty } = S.view;
    mctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    mctx.strokeStyle = "#2f6fde"; mctx.lineWidth = 1.5;
    mctx.strokeRect(m.ox + m.k * (-tx / s), m.oy + m.k * (-ty / s), m.k * canvas.clientWidth / s, m.k * canvas.clientHeight / s);
  }

  // ---------------------------------------------------------------------------------------- view control
  function fit() {
    const b = S.bounds, w = canvas.clientWidth, h = canvas.clientHeight;
    const s = Math.min(1, Math.max(0.05, Math.min(w / (b.x1 - b.x0), h / (b.y1 - b.y0))));
    S.view = { s, tx: (w - s * (b.x1 + b.x0)) / 2, ty: 20 - s * b.y0 };
  }

  /* Fit the whole graph, unless that makes labels unreadable: then start readable at the top (f fits). */
  function firstView() {
    fit();
    if (S.view.s >= 0.3) return;
    const b = S.bounds, s = 0.6;
    S.view = { s, tx: canvas.clientWidth / 2 - s * (b.x0 + b.x1) / 2, ty: 20 - s * b.y0 };
  }

  function centreOn(it, scale) {
    const s = scale || Math.max(S.view.s, 0.8);
    S.view = { s, tx: canvas.clientWidth / 2 - s * it.x, ty: canvas.clientHeight / 2 - s * it.y };
  }

  /* Zoom to scale s keeping the world point under screen point (mx, my) in place. */
  function zoomAt(mx, my, scale) {
    const s = Math.min(4, Math.max(0.02, scale));
    S.view.tx = mx - (mx - S.view.tx) * s / S.view.s; S.view.ty = my - (my - S.view.ty) * s / S.view.s; S.view.s = s;
  }

  function toWorld(ev) {
    const r = canvas.getBoundingClientRect();
    return { x: (ev.clientX - r.left - S.view.tx) / S.view.s, y: (ev.clientY - r.top - S.view.ty) / S.view.s };
  }

  function toScreen(p) {
    const r = canvas.getBoundingClientRect();
    return [r.left + S.view.tx + p.x * S.view.s, r.top + S.view.ty + p.y * S.view.s];
  }

  function itemAt(p) {
    for (let n = S.items.length - 1; n >= 0; n--) {
      const it = S.items[n];
      if (Math.abs(p.x - it.x) <= it.w / 2 && Math.abs(p.y - it.y) <= NH / 2) return it;
    }
    return null;
  }

  function cutAt(p) {
    const tol = 12 / S.view.s;
    return S.cutY.findIndex((y) => Math.abs(p.y - y) <= tol && p.x <= S.bounds.x0 + 210);
  }

  function frameAt(p) {
    for (let n = S.frames.length - 1; n >= 0; n--) {
      const f = S.frames[n];
      if (p.x >= f.x0 && p.x <= f.x0 + 12 + 7 * f.path.length && p.y >= f.y0 && p.y <= f.y0 + 14) return f;
    }
    return null;
  }

  // ------------------------------------------------------------------------------------ collapse / expand
  /* Open one level: the children that hold several operations come up collapsed (Model Explorer's way). */
  function expand(path) {
    S.collapsed.delete(path);
    const depth = path.split(".").length;
    for (const [p, n] of drawnCount) if (n > 1 && p.split(".").length === depth + 1 && within(p, path)) S.collapsed.add(p);
    relayout();
  }

  function collapse(path) { S.collapsed.add(path); relayout(); }

  function reveal(i) {
    for (const p of [...S.collapsed]) if (within(pathOf(i), p)) S.collapsed.delete(p);
    relayout();
    S.selected = i;
    centreOn(itemOfNode(i), Math.max(S.view.s, 1));
    showDetails(i);
    draw();
  }

  function relayout() { build(); miniCache = null; refresh(); }

  // ------------------------------------------------------------------------------------------ side panel
  function refresh() {
    recompute();
    miniCache = null;
    renderFigures();
    renderChart();
    renderCuts();
    renderModules();
    $("#status").textContent = `${S.items.length} boxes (${S.items.filter((it) => it.node >= 0).length} single nodes) · ` +
      `${S.edges.length} edges · ${DRAWN_TOTAL} nodes drawn of ${N} fx nodes`;
    draw();
  }

  function renderFigures() {
    const f = S.fig, costs = f.costs, mean = costs.reduce((a, b) => a + b, 0) / costs.length;
    const tensors = f.boundaries.reduce((a, b) => a + b.length, 0);
    $("#figures").innerHTML = "";
    $("#figures").append(
      el("b", {}, "balance "), `${f.balance.toFixed(3)} max/mean ${D.cost} (${human(Math.max(...costs))} / ${human(mean)}` +
        (D.optimum == null ? ")" : `, optimum ${D.optimum.toFixed(3)} at K=${D.k})`),
      el("b", {}, "  ·  cut "), `${humanBytes(f.bytes_cut)} per sample in ${tensors} tensor(s) over ${S.cuts.length} cut(s)`,
    );
    $("#cuts-arg").value = S.cuts.length ? `--cuts ${f.cuts_arg}` : "(one module: no cuts)";
    const changed = S.cuts.some((c, n) => c !== D.cuts[n]);
    const replayed = Math.abs(D.found.balance - D.reference.balance) > 1e-9 || D.found.bytes_cut !== D.reference.bytes_cut;
    $("#changed").textContent = changed ? "edited: not the partition this page was made from"
      : replayed ? `the search's own split (max/mean ${D.found.balance.toFixed(3)}) shown as its --cuts replay it` : "";
  }

  /* One bar per module (its share of the balancing cost), the mean as a dashed line, the largest in red; a run's
   * hybrid accuracies under each bar while the cuts are the run's own. */
  function renderChart() {
    const f = S.fig, costs = f.costs, k = costs.length, max = Math.max(...costs) || 1;
    const mean = costs.reduce((a, b) => a + b, 0) / k, W = 330, H = 160, bw = Math.min(40, (W - 30) / k - 4);
    const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    const hybrids = D.run && D.run.modules && !S.cuts.some((c, n) => c !== D.cuts[n]) ? D.run.modules : null;
    const extra = hybrids ? 44 : 0;
    svg.setAttribute("width", W); svg.setAttribute("height", H + 30 + extra); svg.setAttribute("id", "balance-chart");
    const add = (tag, attrs, text) => {
      const e = document.createElementNS(ns, tag);
      for (const [a, v] of Object.entries(attrs)) e.setAttribute(a, v);
      if (text !== undefined) e.textContent = text;
      svg.append(e);
      return e;
    };
    costs.forEach((c, j) => {
      const x = 24 + j * ((W - 30) / k), h = (H - 20) * c / max;
      add("rect", { x, y: H - h, width: bw, height: h, fill: c === max ? "#c0392b" : EDGE[j % EDGE.length] });
      add("text", { x: x + bw / 2, y: H + 12, "text-anchor": "middle", "font-size": 10 }, String(j));
      add("text", { x: x + bw / 2, y: H - h - 3, "text-anchor": "middle", "font-size": 9 }, human(c));
      if (hybrids && hybrids[j]) {
        const m = hybrids[j];
        [m.teacher_hybrid_acc, m.incubated_hybrid_acc, m.student_hybrid_acc].forEach((v, r) => {
          if (v !== undefined) add("text", { x: x + bw / 2, y: H + 26 + 12 * r, "text-anchor": "middle", "font-size": 9 }, pct(v));
        });
      }
    });
    const my = H - (H - 20) * mean / max;
    add("line", { x1: 20, x2: W, y1: my, y2: my, stroke: "#1d2433", "stroke-dasharray": "4 3" });
    add("text", { x: W - 2, y: 10, "text-anchor": "end", "font-size": 10 }, `- - mean · max/mean ${f.balance.toFixed(3)}`);
    if (hybrids) add("text", { x: 0, y: H + 26, "font-size": 9 }, "T/I/S");
    $("#chart").replaceChildren(svg);
    $("#chart-legend").textContent = hybrids
      ? "under each bar: teacher / incubated / student hybrid top-1 on val (a hybrid runs module i in the meta model)"
      : (D.run ? "hybrid accuracies hidden: the cuts differ from the run's" : "");
  }

  /* The CLI's table, as far as the page can recompute it: where each module starts, its nodes, params, FLOPs, share
   * of the balancing cost and the bytes it sends on. */
  function renderModules() {
    const f = S.fig, total = f.costs.reduce((a, b) => a + b, 0) || 1;
    const t = table(["#", "starts at", "nodes", "params", "FLOPs", "share", "sends"], f.costs.map((c, j) => [
      String(j), j ? C.cut[S.cuts[j - 1]] : "(input)", String(f.nodes[j]), human(f.params[j]), human(f.flops[j]),
      (100 * c / total).toFixed(1) + "%", j < f.cut_bytes.length ? humanBytes(f.cut_bytes[j]) : "-"]));
    t.className = "modules";
    $("#modules").replaceChildren(t);
  }

  function renderCuts() {
    const box = $("#cuts");
    box.replaceChildren(...S.cuts.map((c, b) => {
      const row = el("div", { class: "cut-row" });
      const name = el("span", { class: "name", title: C.name[c] }, C.cut[c]);
      name.onclick = () => { centreOn(itemOfNode(c)); draw(); };
      const prev = el("button", { "data-cut": b, "data-dir": -1, title: "move the cut up" }, "▲");
      const next = el("button", { "data-cut": b, "data-dir": 1, title: "move the cut down" }, "▼");
      prev.onclick = () => stepCut(b, -1);
      next.onclick = () => stepCut(b, 1);
      row.append(el("span", { class: "muted" }, `cut ${b}`), prev, name, next, el("span", { class: "muted" }, humanBytes(S.fig.cut_bytes[b])));
      return row;
    }));
  }

  function nodeTable(i) {
    const folded = inputs[i].filter((u) => C.op[u] === "get_attr" && !isDrawn(u)).reduce((a, u) => a + C.params[u], 0);
    return pairs([["name", C.name[i]], ["op", C.op[i]], ["target", C.target[i]], ["module path", pathOf(i) || "(top level)"],
      ["shape", C.shape[i]], ["dtype", C.dtype[i] || "-"], ["FLOPs", human(C.flops[i])],
      ["params", human(C.params[i] + folded) + (folded ? " (with the parameters it reads)" : "")],
      ["bytes", humanBytes(C.bytes[i])], ["module", String(S.vis[i])]]);
  }

  function pairs(rows) {
    const table = el("table");
    for (const [k, v] of rows) { const tr = el("tr"); tr.append(el("td", {}, k), el("td", {}, v)); table.append(tr); }
    return table;
  }

  /* The clicked node's fields, and a button per neighbouring cut that may move to it (the "click" way to re-cut). */
  function showDetails(i) {
    const box = $("#details");
    box.replaceChildren(nodeTable(i));
    if (!C.cut[i]) return;
    S.cuts.forEach((c, b) => {
      const [lo, hi] = room(b);
      if (i > lo && i < hi && i !== c) {
        const btn = el("button", {}, `move cut ${b} here (${C.cut[i]})`);
        btn.onclick = () => moveCut(b, i);
        box.append(el("div", { class: "row" }), btn);
      }
    });
  }

  function groupDetails(it) {
    let f = 0, p = 0, by = 0;
    for (const i of it.members) { f += C.flops[i]; p += C.params[i]; by += C.bytes[i]; }
    const mods = [...new Set(it.members.map((i) => S.vis[i]))].join(", ");
    return pairs([["group", it.path], ["nodes", String(it.members.length)], ["FLOPs", human(f)], ["params", human(p)],
      ["bytes out", humanBytes(by)], ["module", mods]]);
  }

  function tooltip(ev, it) {
    const tip = $("#tooltip");
    if (!it) { tip.style.display = "none"; return; }
    showTip(ev, it.node >= 0 ? nodeTable(it.node) : groupDetails(it));
  }

  function showTip(ev, content) {
    const tip = $("#tooltip"), r = $("#stage").getBoundingClientRect();
    tip.replaceChildren(content);
    tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX - r.left + 14, r.width - 300) + "px";
    tip.style.top = ev.clientY - r.top + 14 + "px";
  }

  // ------------------------------------------------------------------------------------------------ search
  function search(query) {
    const q = query.trim().toLowerCase();
    S.matches = [];
    S.matchCursor = -1;
    if (q) for (let i = 0; i < N; i++) {
      if (!isDrawn(i)) continue;
      if (C.name[i].toLowerCase().includes(q) || C.op[i].toLowerCase().includes(q) || C.target[i].toLowerCase().includes(q)
        || pathOf(i).toLowerCase().includes(q)) S.matches.push(i);
    }
    const list = $("#matches");
    list.replaceChildren(...S.matches.slice(0, 40).map((i) => {
      const row = el("div", { title: pathOf(i) });
      row.append(C.name[i] + " ", el("small", {}, `${C.op[i] === "call_module" ? "module" : C.target[i]} · ${pathOf(i)}`));
      row.onclick = () => reveal(i);
      return row;
    }));
    $("#match-count").textContent = q ? `${S.matches.length} match${S.matches.length === 1 ? "" : "es"}` +
      (S.matches.length > 40 ? " (first 40 listed; Enter steps through all)" : "") : "";
    draw();
    return S.matches.length;
  }

  function nextMatch() {
    if (!S.matches.length) return;
    S.matchCursor = (S.matchCursor + 1) % S.matches.length;
    reveal(S.matches[S.matchCursor]);
  }

  // ------------------------------------------------------------------------------------------------ events
  function wire() {
    let down = null;
    canvas.addEventListener("pointerdown", (ev) => {
      const p = toWorld(ev), cut = cutAt(p);
      canvas.setPointerCapture(ev.pointerId);
      down = { x: ev.clientX, y: ev.clientY, tx: S.view.tx, ty: S.view.ty, moved: false };
      if (cut >= 0) { S.drag = { cut, start: S.cuts[cut] }; canvas.classList.add("cutting"); } else canvas.classList.add("panning");
    });
    canvas.addEventListener("pointermove", (ev) => {
      if (!down) { hover(ev); return; }
      if (Math.abs(ev.clientX - down.x) + Math.abs(ev.clientY - down.y) > 3) down.moved = true;
      if (S.drag) {
        const p = nearestCutPoint(S.drag.cut, toWorld(ev).y);
        if (p >= 0 && p !== S.cuts[S.drag.cut]) moveCut(S.drag.cut, p);
        return;
      }
      S.view.tx = down.tx + ev.clientX - down.x; S.view.ty = down.ty + ev.clientY - down.y;
      draw();
    });
    canvas.addEventListener("pointerup", (ev) => {
      const wasDrag = S.drag, moved = down && down.moved;
      down = null; S.drag = null;
      canvas.classList.remove("panning", "cutting");
      if (!moved && !wasDrag) click(toWorld(ev));
      draw();
    });
    canvas.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const r = canvas.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top;
      zoomAt(mx, my, S.view.s * Math.exp(-ev.deltaY * 0.0015));
      draw();
    }, { passive: false });
    canvas.addEventListener("pointerleave", () => { S.hoverItem = null; $("#tooltip").style.display = "none"; draw(); });
    const jump = (ev) => {
      if (ev.buttons !== 1 && ev.type !== "click") return;
      const r = mini.getBoundingClientRect(), m = minimapScale();
      const x = (ev.clientX - r.left - m.ox) / m.k, y = (ev.clientY - r.top - m.oy) / m.k;
      centreOn({ x, y }, S.view.s); draw();
    };
    mini.addEventListener("pointermove", jump);
    mini.addEventListener("click", jump);
    $("#search").addEventListener("input", (ev) => search(ev.target.value));
    $("#search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") nextMatch(); });
    $("#colour").addEventListener("change", (ev) => { S.colour = ev.target.value; miniCache = null; draw(); });
    $("#btn-blocks").onclick = () => { S.collapsed = new Set(D.collapsed); relayout(); fit(); draw(); };
    $("#btn-expand").onclick = () => { S.collapsed = new Set(); relayout(); fit(); draw(); };
    $("#btn-collapse").onclick = () => { S.collapsed = new Set(topPaths()); relayout(); fit(); draw(); };
    $("#btn-fit").onclick = () => { fit(); draw(); };
    $("#btn-reset").onclick = () => { S.cuts = D.cuts.slice(); refresh(); };
    $("#btn-copy").onclick = copyCuts;
    window.addEventListener("resize", () => { miniCache = null; draw(); });
    window.addEventListener("keydown", (ev) => {
      if (ev.target.tagName === "INPUT") return;
      if (ev.key === "/") { ev.preventDefault(); $("#search").focus(); }
      if (ev.key === "f") { fit(); draw(); }
      if (ev.key === "+" || ev.key === "=" || ev.key === "-") {
        zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, S.view.s * (ev.key === "-" ? 0.8 : 1.25));
        draw();
      }
    });
  }

  function hover(ev) {
    const p = toWorld(ev), cut = cutAt(p), it = cut >= 0 ? null : itemAt(p);
    if (it !== S.hoverItem) { S.hoverItem = it; draw(); }
    if (cut >= 0) cutTooltip(ev, cut); else tooltip(ev, it);
  }

  /* Every value crossing cut b: what module b + 1 onwards receives per sample. */
  function cutTooltip(ev, b) {
    showTip(ev, pairs([[`cut ${b} at ${C.cut[S.cuts[b]]}`, `${humanBytes(S.fig.cut_bytes[b])} per sample`],
      ...S.fig.boundaries[b].map((u) => [C.name[u], `${C.shape[u]} · ${humanBytes(C.bytes[u])}`])]));
  }

  function click(p) {
    const frame = frameAt(p);
    if (frame) { collapse(frame.path); return; }
    const it = itemAt(p);
    if (!it) { S.selected = -1; draw(); return; }
    if (it.node < 0) { expand(it.path); $("#details").replaceChildren(groupDetails(it)); return; }
    S.selected = it.node;
    showDetails(it.node);
    draw();
  }

  function topPaths() {
    return [...drawnCount.keys()].filter((p) => !p.includes(".") && drawnCount.get(p) > 1);
  }

  function copyCuts() {
    const text = $("#cuts-arg").value;
    const done = () => { $("#btn-copy").textContent = "copied"; setTimeout(() => { $("#btn-copy").textContent = "copy --cuts"; }, 1200); };
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, fallback);
    else fallback();
    function fallback() { $("#cuts-arg").select(); document.execCommand("copy"); done(); }
  }

  // ------------------------------------------------------------------------------------------- the page
  function skeleton() {
    const app = $("#app");
    app.innerHTML = `
<header><h1></h1><span class="figures" id="figures"></span><span class="changed" id="changed"></span></header>
<div id="stage"><div id="tooltip"></div><div id="status"></div></div>
<aside>
  <input id="search" type="search" placeholder="search name, op or module path  ( / )" autocomplete="off">
  <div class="muted" id="match-count"></div><div id="matches"></div>
  <h2>View</h2>
  <div class="row"><button id="btn-blocks">collapse to blocks</button><button id="btn-collapse">collapse all</button>
    <button id="btn-expand">expand all</button><button id="btn-fit">fit (f)</button></div>
  <div class="row">colour by <select id="colour"><option value="module">module</option><option value="flops">FLOPs</option>
    <option value="params">params</option><option value="bytes">bytes</option></select></div>
  <div class="muted">click a ▸ box to expand it, a ▾ frame title to collapse it; drag to pan, wheel to zoom;
    +/- zoom; drag a red ✂ handle to move a cut.</div>
  <h2>Balance</h2><div id="chart"></div><div class="muted" id="chart-legend"></div>
  <h2>Modules</h2><div id="modules"></div>
  <h2>Cuts</h2><div id="cuts"></div>
  <input id="cuts-arg" readonly><div class="row"><button id="btn-copy">copy --cuts</button><button id="btn-reset">reset cuts</button></div>
  <h2>Selected</h2><div id="details" class="muted">click a node</div>
</aside>`;
    $("header h1").textContent = `${D.model} → ${D.k} modules`;
    $("#stage").prepend(canvas, mini);
    ctx = canvas.getContext("2d");
    mctx = mini.getContext("2d");
    S.maxOf = { flops: Math.max(...C.flops), params: Math.max(...C.params), bytes: Math.max(...C.bytes) };
  }

  /* A run's report: results, per-module hybrids, job times and the curves, under the explorer. */
  function runSection() {
    const run = D.run;
    if (!run) return;
    const sec = el("section", { class: "run" });
    sec.append(el("h2", {}, run.title || "run"));
    if (run.description) sec.append(el("p", { class: "muted" }, run.description));
    sec.append(table(["model", "IID top-1", "OOD top-1"], run.results.map((r) => [r.label, pct(r.iid_acc), pct(r.ood_acc)])));
    if (run.modules && run.modules.length) {
      sec.append(el("h3", {}, "Per module (val top-1 of each hybrid meta[:i] → module i → meta[i+1:])"));
      const keys = run.module_columns;
      sec.append(table(["module", ...keys.map((k) => k[1])], run.modules.map((m) => [String(m.module), ...keys.map((k) => pct(m[k[0]]))])));
    }
    for (const w of run.warnings || []) sec.append(el("p", { class: "warn" }, "warning: " + w));
    if (run.curves) { sec.append(el("h3", {}, "Training curves")); sec.append(el("img", { src: run.curves, alt: "training curves" })); }
    sec.append(el("h3", {}, "Jobs"));
    sec.append(table(["job", "wall time (s)"], run.jobs.map(([n, s]) => [n, s === null ? "-" : s.toFixed(1)])));
    document.body.append(sec);
    document.body.style.overflow = "auto";
  }

  function table(header, rows) {
    const t = el("table"), tr = el("tr");
    header.forEach((h) => tr.append(el("th", {}, h)));
    t.append(tr);
    rows.forEach((r) => { const row = el("tr"); r.forEach((c) => row.append(el("td", {}, c))); t.append(row); });
    return t;
  }

  if (location.hash === "#expanded") S.collapsed = new Set();  // open with every node drawn (benchmarks, links)
  skeleton();
  runSection();
  wire();
  build();
  recompute();
  firstView();
  refresh();
  requestAnimationFrame(() => {
    window.monomodRendered = performance.now();
  });

  /* A node by its fx name, or by the --cuts name of the point it starts. */
  const nodeIndex = (name) => (C.name.includes(name) ? C.name.indexOf(name) : C.cut.indexOf(name));

  // For tests and scripting: the figures the page shows, and the actions its controls take.
  window.monomod = {
    figures: () => ({ ...S.fig, asg: undefined, cuts: S.cuts.slice(), cut_names: S.cuts.map((c) => C.cut[c]) }),
    visibleCount: () => S.items.length,
    search, nextMatch, reveal, expand, collapse, stepCut, moveCut,
    legalPoints: () => legal.slice(),
    setCuts: (positions) => {
      const ok = positions.every((c, n) => C.cut[c] && (n === 0 || c > positions[n - 1]));
      if (ok) { S.cuts = positions.slice(); refresh(); }
      return ok;
    },
    redraw: () => { const t = performance.now(); draw(); return performance.now() - t; },
    zoom: (s) => { zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, s); draw(); },
    collapseToBlocks: () => $("#btn-blocks").click(),
    expandAll: () => $("#btn-expand").click(),
    collapseAll: () => $("#btn-collapse").click(),
    selected: () => (S.selected >= 0 ? C.name[S.selected] : null),
    centre: () => ({ x: (canvas.clientWidth / 2 - S.view.tx) / S.view.s, y: (canvas.clientHeight / 2 - S.view.ty) / S.view.s }),
    itemPosition: (name) => { const it = itemOfNode(nodeIndex(name)); return it ? { x: it.x, y: it.y } : null; },
    screenOf: (name) => toScreen(itemOfNode(nodeIndex(name))),
    cutHandle: (b) => toScreen({ x: S.bounds.x0 + 100, y: S.cutY[b] }),
    frameTitle: (path) => { const f = S.frames.find((g) => g.path === path); return f ? toScreen({ x: f.x0 + 8, y: f.y0 + 7 }) : null; },
  };
})();
