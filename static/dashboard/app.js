// Squall live telemetry dashboard: a plain ES module, no bundler.
//
// Data flow:
//   * GET /api/devices (Bearer token) every POLL_MS: the device list, with
//     online dots, last seen and last values.
//   * Picking a device: subscribe to `telemetry:<id>` over the Centrifugo
//     protocol (official `centrifuge` SDK, window.Centrifuge) with
//     {max_rate: MAX_RATE}, then backfill each metric's last WINDOW_MS from
//     GET /api/devices/<id>/telemetry in STEP_MS buckets. Live points that
//     arrive during the backfill are held back and folded in afterwards (only
//     those at or after the backfill's `to`, which the query excludes), into
//     the same STEP_MS buckets.
//   * Live delivery is conflated: with max_rate the server sends the latest
//     publication of each 1/MAX_RATE s, so a fast device's live buckets hold a
//     sample of its points. Every RECONCILE_MS the last RECONCILE_LOOKBACK_MS
//     are re-read from the query API (every point) and replace the sampled
//     buckets; live points at or after that read's `to` are folded in again.
//
// For tests and the curious, window.__squall exposes the state (connection,
// devices, live point counters), and #charts carries data-live-points.

const TOKEN_KEY = 'squall.dashboard.token';
const WINDOW_MS = 10 * 60 * 1000; // chart window: the last 10 minutes
const STEP_MS = 1000;             // bucket width: 600 buckets per window
const MAX_RATE = 10;              // publications per second we ask the server for
const POLL_MS = 3000;             // device list refresh
const RECONCILE_MS = 15_000;      // re-read recent history this often (see above)
const RECONCILE_LOOKBACK_MS = 60_000;
const SERIES = ['t', 'min', 'max', 'sum', 'count'];
const CHART_HEIGHT = 180;         // px
const MAX_ERRORS = 50;            // window.__squall.errors keeps the last ones
const MAX_CHARTS = 32;            // charts per device: a device inventing metric names must
                                  // not make a chart (and its history reads) for each one
const MAX_LAST_VALUES = 256;      // last values kept per device (the server keeps 256 too)
const SETUP_HINT = 'run scripts/setup (npm ci)';
const MINT_HINT = "mint one with: python run.py token --sub USER --devices '*'";

const $ = (id) => document.getElementById(id);

const state = {
  conn: 'idle',         // idle | connecting | connected | disconnected
  devices: new Map(),   // id -> {id, last_seen, online, last_values}
  selected: null,       // device id
  subscription: 'none', // none | subscribing | subscribed | unsubscribed | error
  received: 0,          // live points received for the selected device
  livePoints: 0,        // live points folded into the charts
  publications: 0,
  lastLiveAt: 0,
  errors: [],           // the last MAX_ERRORS messages shown, oldest first
};
window.__squall = state;
// A copy of one chart's buckets of the selected device (for tests and the console).
state.series = (metric) => {
  const chart = view?.charts.get(metric);
  return chart ? Object.fromEntries(SERIES.map((key) => [key, [...chart[key]]])) : null;
};

let token = '';
let uPlot = null;      // the uPlot constructor, once loaded
let client = null;     // Centrifuge client
let view = null;       // the selected device's charts and subscription
let pollTimer = 0;
let refreshing = false;
let listFrame = 0;
const rowsShown = new WeakMap(); // device row (li) -> what it shows (JSON), to skip unchanged rows

// ------------------------------------------------------------------ helpers

const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

function fmt(value) {
  return typeof value === 'number' && Number.isFinite(value) ? numberFormat.format(value) : '–';
}

function ago(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 2) return 'just now';
  if (s < 90) return `${s} s ago`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min ago`;
  return new Date(ms).toLocaleString();
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// One banner; `source` lets a recovery (say, the connection coming back) clear
// only the message it caused.
function showError(message, source = 'app') {
  state.errors.push(message);
  // A poll fails every few seconds while the server is down: keep the recent ones.
  if (state.errors.length > MAX_ERRORS) state.errors.splice(0, state.errors.length - MAX_ERRORS);
  const banner = $('error');
  banner.textContent = message;
  banner.dataset.source = source;
  banner.hidden = false;
}

// Without a source: everything but a missing library (that needs a fix on the server).
function clearError(source) {
  const banner = $('error');
  if (source ? banner.dataset.source !== source : banner.dataset.source === 'vendor') return;
  banner.hidden = true;
  banner.textContent = '';
}

function setConn(conn, text) {
  state.conn = conn;
  $('conn').dataset.state = conn;
  $('conn-text').textContent = text;
}

function setSubState(sub, text) {
  state.subscription = sub;
  $('sub-state').textContent = text;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  let resp;
  try {
    resp = await fetch(path, {
      headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
      cache: 'no-store',
    });
  } catch (err) {
    throw new ApiError(0, `cannot reach Squall (${err.message})`);
  }
  if (!resp.ok) {
    let detail = resp.statusText;
    try {
      const body = await resp.json();
      detail = body?.error?.message ?? body?.error ?? body?.message ?? detail;
    } catch {
      // not JSON (a proxy's or Tornado's HTML error page): keep the status text
    }
    throw new ApiError(resp.status, `HTTP ${resp.status}: ${detail}`);
  }
  return resp.json();
}

// ------------------------------------------------------------------ sign in / out

function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const fromUrl = params.get('token');
  if (!fromUrl) return;
  sessionStorage.setItem(TOKEN_KEY, fromUrl.trim());
  // Keep the token out of the address bar and the history.
  params.delete('token');
  const rest = params.toString();
  history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
}

function showSignIn(message) {
  $('main').hidden = true;
  $('signout').hidden = true;
  $('signin').hidden = false;
  if (message) showError(message);
  $('token-input').focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  token = '';
  stop();
  setConn('idle', 'not connected');
  clearError();
  showSignIn(message);
}

function rejected(why) {
  signOut(`Token rejected (${why}). Paste a dashboard token; ${MINT_HINT}`);
}

function stop() {
  clearInterval(pollTimer);
  pollTimer = 0;
  closeView();
  if (client) {
    const old = client;
    client = null;
    old.removeAllListeners();
    old.disconnect();
  }
  state.devices.clear();
  state.selected = null;
  $('device-list').replaceChildren();
  $('detail-title').textContent = 'Pick a device';
  $('detail-hint').textContent = 'Select a device on the left to chart its last 10 minutes, then live.';
  $('detail-hint').hidden = false;
  $('charts').replaceChildren();
  $('charts').dataset.device = '';
  $('charts').dataset.livePoints = '0';
}

async function start() {
  clearError();
  $('signin').hidden = true;
  $('main').hidden = false;
  $('signout').hidden = false;
  // The device list first: it tells a bad token apart from a good one with a clear status.
  if (!(await refreshDevices())) return;
  connect();
  pollTimer = setInterval(refreshDevices, POLL_MS);
}

// ------------------------------------------------------------------ devices

async function refreshDevices() {
  if (refreshing) return true; // a slow server: do not pile up polls
  refreshing = true;
  let body;
  try {
    body = await api('/api/devices');
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      rejected(err.message);
      return false;
    }
    showError(`Device list: ${err.message}`, 'devices');
    $('devices-updated').textContent = 'update failed';
    $('device-list').classList.add('stale');
    return true; // keep polling: the server may come back
  } finally {
    refreshing = false;
  }
  if (!token) return false; // signed out meanwhile
  clearError('devices');
  $('device-list').classList.remove('stale');
  const seen = new Set();
  for (const dev of body.devices ?? []) {
    seen.add(dev.id);
    const known = state.devices.get(dev.id);
    // Live points may be newer than the list (it is read every few seconds).
    if (known && known.last_seen > dev.last_seen) {
      dev.last_seen = known.last_seen;
      dev.last_values = capped({ ...dev.last_values, ...known.last_values });
    }
    if (known) dev.liveTs = known.liveTs;
    state.devices.set(dev.id, dev);
  }
  for (const id of [...state.devices.keys()]) {
    if (!seen.has(id)) state.devices.delete(id);
  }
  $('devices-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  renderDevices();
  return true;
}

function scheduleRenderDevices() {
  if (!listFrame) {
    listFrame = requestAnimationFrame(() => {
      listFrame = 0;
      renderDevices();
    });
  }
}

function renderDevices() {
  const list = $('device-list');
  const items = new Map([...list.children].map((li) => [li.dataset.deviceId, li]));
  const ids = [...state.devices.keys()].sort();
  $('devices-empty').hidden = ids.length > 0;
  ids.forEach((id, index) => {
    const dev = state.devices.get(id);
    let li = items.get(id);
    if (!li) {
      li = el('li', 'device');
      li.dataset.deviceId = id;
      const button = el('button', 'device-button');
      button.type = 'button';
      button.addEventListener('click', () => selectDevice(id));
      const head = el('span', 'device-head');
      head.append(el('span', 'dot'), el('span', 'device-id', id), el('span', 'last-seen muted'));
      button.append(head, el('span', 'values'));
      li.append(button);
    }
    items.delete(id);
    if (list.children[index] !== li) list.insertBefore(li, list.children[index] ?? null);
    // Every live point re-renders the list: touching every row (and rebuilding its
    // chips) each time froze the page with a thousand devices, so a row whose
    // content is unchanged is left alone.
    const selected = id === state.selected;
    const shown = JSON.stringify([dev.online, selected, dev.last_seen ?? 0, dev.last_values ?? {}]);
    if (rowsShown.get(li) === shown) return;
    rowsShown.set(li, shown);
    li.dataset.online = dev.online ? 'true' : 'false';
    li.classList.toggle('selected', selected);
    const button = li.firstChild;
    button.setAttribute('aria-pressed', selected ? 'true' : 'false');
    button.title = dev.online ? `${id}: online` : `${id}: offline`;
    li.querySelector('.last-seen').textContent = ago(dev.last_seen);
    li.querySelector('.last-seen').dataset.ms = String(dev.last_seen ?? 0);
    const chips = Object.entries(dev.last_values ?? {})
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([metric, value]) => {
        const chip = el('span', 'chip');
        chip.append(el('span', 'chip-name', metric), el('span', 'chip-value', fmt(value)));
        return chip;
      });
    li.querySelector('.values').replaceChildren(...chips);
  });
  for (const li of items.values()) li.remove();
}

function tickTimes() {
  for (const span of document.querySelectorAll('.last-seen[data-ms]')) {
    const text = ago(Number(span.dataset.ms));
    if (span.textContent !== text) span.textContent = text; // each write costs a relayout
  }
}

// ------------------------------------------------------------------ live connection

function connect() {
  const Centrifuge = globalThis.Centrifuge;
  if (!Centrifuge) {
    showError(`The Centrifuge SDK did not load (/vendor/centrifuge/centrifuge.js): ${SETUP_HINT}`, 'vendor');
    setConn('disconnected', 'SDK missing');
    return;
  }
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  client = new Centrifuge(`${scheme}://${location.host}/connection/websocket`, {
    token,
    // No way to mint a fresh token in the browser: when this one expires, sign in again.
    getToken: async () => {
      throw new Centrifuge.UnauthorizedError('token expired');
    },
  });
  client.on('connecting', (ctx) => setConn('connecting', `connecting… (${ctx.reason})`));
  client.on('connected', () => {
    setConn('connected', 'live');
    clearError('connection');
  });
  client.on('disconnected', (ctx) => {
    setConn('disconnected', `disconnected: ${ctx.reason} (${ctx.code})`);
    // 1: getToken above refused, which it does only when the token expired (the SDK
    // says just "unauthorized"); 3500: the server said invalid token.
    if (ctx.code === 1) rejected('token expired');
    else if (ctx.code === 3500) rejected(`WebSocket: ${ctx.reason}`);
  });
  client.on('error', (ctx) => {
    const err = ctx.error ?? {};
    const code = err.code ? ` (${err.code})` : '';
    showError(`Live connection (${ctx.type}): ${err.message ?? 'error'}${code}`, 'connection');
  });
  client.connect();
}

// ------------------------------------------------------------------ selected device

function selectDevice(id) {
  if (state.selected === id) return;
  closeView();
  state.selected = id;
  state.received = 0;
  state.livePoints = 0;
  state.publications = 0;
  renderDevices();
  $('detail-title').textContent = id;
  $('detail-hint').hidden = true;
  const charts = $('charts');
  charts.dataset.device = id;
  charts.dataset.livePoints = '0';
  charts.replaceChildren();
  view = { id, charts: new Map(), sub: null, closed: false, wasSubscribed: false, timer: 0 };
  const dev = state.devices.get(id);
  const to = Date.now();
  for (const metric of Object.keys(dev?.last_values ?? {}).sort()) {
    chartFor(view, metric, to);
  }
  if (!view.charts.size) {
    $('detail-hint').textContent = 'No values yet: charts appear with the first live point.';
    $('detail-hint').hidden = false;
  }
  subscribe(view);
  const v = view;
  v.timer = setInterval(() => v.charts.forEach((chart) => reconcile(v, chart)), RECONCILE_MS);
}

function closeView() {
  if (!view) return;
  view.closed = true;
  clearInterval(view.timer);
  if (view.sub && client) {
    view.sub.removeAllListeners();
    client.removeSubscription(view.sub);
  }
  for (const chart of view.charts.values()) chart.plot?.destroy();
  view = null;
  setSubState('none', '');
  // Its history and live-update errors go with it (else they stay up until sign-out).
  clearError('view');
}

function subscribe(v) {
  if (!client) {
    setSubState('error', 'no live connection');
    return;
  }
  const channel = `telemetry:${v.id}`;
  const existing = client.getSubscription(channel);
  if (existing) client.removeSubscription(existing);
  const sub = client.newSubscription(channel, { data: { max_rate: MAX_RATE } });
  v.sub = sub;
  sub.on('subscribing', (ctx) => setSubState('subscribing', `subscribing… (${ctx.reason})`));
  sub.on('subscribed', () => {
    setSubState('subscribed', `live, up to ${MAX_RATE} updates/s`);
    // Back after a disconnect: what the device sent meanwhile is only in the history.
    if (v.wasSubscribed) refill(v);
    v.wasSubscribed = true;
  });
  sub.on('unsubscribed', (ctx) => setSubState('unsubscribed', `not live: ${ctx.reason} (${ctx.code})`));
  sub.on('error', (ctx) => {
    const err = ctx.error ?? {};
    setSubState('error', `live updates failed (${err.code ?? '?'})`);
    showError(`Live updates for ${v.id}: ${err.message ?? 'error'} (${err.code ?? '?'})`, 'view');
  });
  sub.on('publication', (ctx) => onPublication(v, ctx.data));
  sub.subscribe();
}

function onPublication(v, data) {
  if (v.closed) return;
  const points = Array.isArray(data?.points) ? data.points : [];
  state.publications += 1;
  const dev = state.devices.get(v.id);
  for (const point of points) {
    if (typeof point?.ts !== 'number' || typeof point.values !== 'object' || !point.values) continue;
    state.received += 1;
    let applied = false;
    for (const [metric, value] of Object.entries(point.values)) {
      if (typeof value !== 'number') continue;
      const chart = chartFor(v, metric, Date.now());
      if (!chart) continue;
      if (chart.ready) {
        fold(chart, point.ts, value);
        applied = true;
      } else {
        chart.pending.push([point.ts, value]);
      }
    }
    if (applied) countLive(1);
    // Last values follow the newest point by ts; "last seen" is now (the server just
    // heard from it), in this browser's clock like the "… ago" it is shown as.
    if (dev && point.ts >= (dev.liveTs ?? 0)) {
      dev.liveTs = point.ts;
      dev.last_values = capped({ ...dev.last_values, ...point.values });
    }
  }
  if (dev && points.length) {
    dev.last_seen = Math.max(dev.last_seen ?? 0, Date.now());
    dev.online = true;
  }
  state.lastLiveAt = Date.now();
  scheduleRenderDevices();
}

function countLive(n) {
  state.livePoints += n;
  $('charts').dataset.livePoints = String(state.livePoints);
}

// ------------------------------------------------------------------ charts

// The newest MAX_LAST_VALUES names (an object keeps insertion order: new names last).
function capped(values) {
  const names = Object.keys(values);
  if (names.length <= MAX_LAST_VALUES) return values;
  for (const name of names.slice(0, names.length - MAX_LAST_VALUES)) delete values[name];
  return values;
}

// The metric's chart, made if there is room (MAX_CHARTS); null once the view is full,
// with a note saying how many metrics are left out.
function chartFor(v, metric, backfillTo) {
  const chart = v.charts.get(metric);
  if (chart) return chart;
  if (v.charts.size < MAX_CHARTS) return addChart(v, metric, backfillTo);
  v.skipped ??= new Set();
  if (!v.skipped.has(metric) && v.skipped.size < MAX_LAST_VALUES) {
    v.skipped.add(metric);
    const hint = $('detail-hint');
    hint.textContent = `${v.skipped.size} more metrics not charted (at most ${MAX_CHARTS} per device).`;
    hint.hidden = false;
  }
  return null;
}

// The device's history URL; null for the ids "." and "..", which a browser takes for
// path steps (%2E too): "/api/devices/../telemetry" is another endpoint altogether.
function historyUrl(v, query) {
  if (v.id === '.' || v.id === '..') return null;
  return `/api/devices/${encodeURIComponent(v.id)}/telemetry?${query}`;
}

// One chart per metric: bucket start times and per-bucket min/max/sum/count.
// Live values wait in `pending` until the backfill up to `backfillTo` is in.
function addChart(v, metric, backfillTo) {
  const box = el('figure', 'chart');
  box.dataset.metric = metric;
  const head = el('figcaption', 'chart-head');
  const latest = el('span', 'latest');
  const note = el('span', 'muted note', 'loading last 10 min…');
  head.append(el('span', 'metric', metric), latest, note);
  const plotBox = el('div', 'plot');
  box.append(head, plotBox);
  $('charts').append(box);
  $('detail-hint').hidden = true;
  const chart = {
    metric, box, latest, note, plotBox,
    t: [], min: [], max: [], sum: [], count: [],
    recent: [], // [ts, value] of live points of the last RECONCILE_LOOKBACK_MS
    ready: false, pending: [], reconciling: false, plot: null, frame: 0,
    gen: 0, // bumped by each backfill: only the newest one's answer is applied
  };
  v.charts.set(metric, chart);
  if (uPlot) chart.plot = makePlot(chart);
  backfill(v, chart, backfillTo);
  return chart;
}

function makePlot(chart) {
  const width = Math.max(300, chart.plotBox.clientWidth || 600);
  return new uPlot(
    {
      width,
      height: CHART_HEIGHT,
      scales: {
        x: {
          time: true,
          range: () => {
            const now = Date.now();
            return [(now - WINDOW_MS) / 1000, now / 1000];
          },
        },
      },
      series: [
        {},
        { label: 'avg', stroke: '#2563eb', width: 2, value: (u, val) => fmt(val) },
        { label: 'min', stroke: '#93c5fd', width: 1, value: (u, val) => fmt(val) },
        { label: 'max', stroke: '#93c5fd', width: 1, value: (u, val) => fmt(val) },
      ],
      bands: [{ series: [3, 2], fill: 'rgba(37, 99, 235, 0.12)' }],
      axes: [{}, { size: 60 }],
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
    },
    chartData(chart),
    chart.plotBox,
  );
}

function chartData(chart) {
  const avg = chart.sum.map((s, i) => (chart.count[i] ? s / chart.count[i] : null));
  return [chart.t.map((t) => t / 1000), avg, chart.min, chart.max];
}

function redraw(chart) {
  // Here, not only in the frame: a hidden tab runs no animation frames, and its
  // series would grow for as long as it stays in the background.
  trim(chart);
  if (chart.frame) return;
  chart.frame = requestAnimationFrame(() => {
    chart.frame = 0;
    trim(chart);
    chart.plot?.setData(chartData(chart));
    const n = chart.t.length;
    chart.latest.textContent = n ? fmt(chart.last ?? chart.sum[n - 1] / chart.count[n - 1]) : '';
  });
}

function trim(chart) {
  const cutoff = Date.now() - WINDOW_MS - STEP_MS;
  let drop = 0;
  while (drop < chart.t.length && chart.t[drop] < cutoff) drop += 1;
  if (drop) {
    for (const key of SERIES) chart[key].splice(0, drop);
  }
  const recentCutoff = Date.now() - RECONCILE_LOOKBACK_MS - RECONCILE_MS;
  drop = 0;
  while (drop < chart.recent.length && chart.recent[drop][0] < recentCutoff) drop += 1;
  if (drop) chart.recent.splice(0, drop);
}

// Fold one live value into its STEP_MS bucket (and remember it for reconcile).
function fold(chart, ts, value) {
  chart.recent.push([ts, value]);
  foldValue(chart, ts, value);
}

function foldValue(chart, ts, value) {
  const bucket = Math.floor(ts / STEP_MS) * STEP_MS;
  let i = chart.t.length - 1;
  while (i >= 0 && chart.t[i] > bucket) i -= 1;
  if (i >= 0 && chart.t[i] === bucket) {
    chart.min[i] = Math.min(chart.min[i], value);
    chart.max[i] = Math.max(chart.max[i], value);
    chart.sum[i] += value;
    chart.count[i] += 1;
  } else {
    chart.t.splice(i + 1, 0, bucket);
    chart.min.splice(i + 1, 0, value);
    chart.max.splice(i + 1, 0, value);
    chart.sum.splice(i + 1, 0, value);
    chart.count.splice(i + 1, 0, 1);
  }
  if (ts >= (chart.lastTs ?? 0)) {
    chart.lastTs = ts;
    chart.last = value;
  }
  redraw(chart);
}

async function backfill(v, chart, to) {
  // A reconnect while an earlier backfill is still loading starts another one: the
  // older answer must not be appended too (every bucket would be drawn twice).
  const gen = ++chart.gen;
  const from = Math.floor((to - WINDOW_MS) / STEP_MS) * STEP_MS;
  const query = new URLSearchParams({ metric: chart.metric, from, to, step: STEP_MS });
  const url = historyUrl(v, query);
  try {
    if (!url) throw new ApiError(0, 'not kept for this device id');
    const body = await api(url);
    if (v.closed || chart.gen !== gen) return;
    appendBuckets(chart, body.points);
    chart.note.textContent = `${(body.points ?? []).length} buckets of ${STEP_MS / 1000} s, then live`;
    chart.box.dataset.backfilled = String((body.points ?? []).length);
  } catch (err) {
    if (v.closed || chart.gen !== gen) return;
    if (err.status === 401 || err.status === 403) {
      rejected(err.message);
      return;
    }
    chart.note.textContent = `history unavailable (${err.message}); live only`;
    showError(`History of ${v.id}/${chart.metric}: ${err.message}`, 'view');
  }
  // Go live: fold what arrived meanwhile, skipping what the backfill already counted
  // (the query has from <= ts < to: a point stamped `to` is not in it).
  chart.ready = true;
  let applied = 0;
  for (const [ts, value] of chart.pending) {
    if (ts >= to) {
      fold(chart, ts, value);
      applied += 1;
    }
  }
  chart.pending = [];
  if (applied) countLive(applied);
  redraw(chart);
}

function appendBuckets(chart, points) {
  for (const p of points ?? []) {
    if (typeof p?.t !== 'number' || !p.count) continue;
    chart.t.push(p.t);
    chart.min.push(p.min);
    chart.max.push(p.max);
    chart.sum.push(p.avg * p.count);
    chart.count.push(p.count);
  }
}

// Replace the recent (sampled) live buckets with the server's, which count every point.
async function reconcile(v, chart) {
  if (!chart.ready || chart.reconciling || v.closed) return;
  chart.reconciling = true;
  const gen = chart.gen;
  const to = Date.now();
  const from = Math.floor((to - RECONCILE_LOOKBACK_MS) / STEP_MS) * STEP_MS;
  const query = new URLSearchParams({ metric: chart.metric, from, to, step: STEP_MS });
  const url = historyUrl(v, query);
  if (!url) {
    chart.reconciling = false;
    return;
  }
  try {
    const body = await api(url);
    if (v.closed || !chart.ready || chart.gen !== gen) return; // closed, or a refill started meanwhile
    let keep = chart.t.findIndex((t) => t >= from);
    if (keep < 0) keep = chart.t.length;
    for (const key of SERIES) chart[key].length = keep;
    appendBuckets(chart, body.points);
    for (const [ts, value] of chart.recent) if (ts >= to) foldValue(chart, ts, value);
    redraw(chart);
  } catch (err) {
    if (err.status === 401 || err.status === 403) rejected(err.message);
    // Otherwise keep the live picture; the device list poll reports an unreachable server.
  } finally {
    chart.reconciling = false;
  }
}

function refill(v) {
  const to = Date.now();
  for (const chart of v.charts.values()) {
    for (const key of SERIES) chart[key] = [];
    chart.recent = [];
    chart.ready = false;
    chart.pending = [];
    chart.note.textContent = 'reloading last 10 min…';
    backfill(v, chart, to);
  }
}

function resizeCharts() {
  if (!view) return;
  for (const chart of view.charts.values()) {
    if (chart.plot) {
      chart.plot.setSize({ width: Math.max(300, chart.plotBox.clientWidth), height: CHART_HEIGHT });
    }
  }
}

// ------------------------------------------------------------------ boot

async function loadCharts() {
  try {
    uPlot = (await import('/vendor/uplot/uPlot.esm.js')).default;
  } catch (err) {
    showError(`The chart library did not load (/vendor/uplot/uPlot.esm.js): ${SETUP_HINT}`, 'vendor');
  }
}

function boot() {
  $('signin-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const value = $('token-input').value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $('token-input').value = '';
    token = value;
    start();
  });
  $('signout').addEventListener('click', () => signOut(''));
  window.addEventListener('hashchange', () => {
    const before = sessionStorage.getItem(TOKEN_KEY);
    tokenFromFragment();
    const after = sessionStorage.getItem(TOKEN_KEY);
    if (after && after !== before) {
      stop();
      token = after;
      start();
    }
  });
  new ResizeObserver(resizeCharts).observe($('charts'));
  setInterval(tickTimes, 1000);

  tokenFromFragment();
  token = sessionStorage.getItem(TOKEN_KEY) ?? '';
  if (token) start();
  else showSignIn('');
}

await loadCharts();
boot();
