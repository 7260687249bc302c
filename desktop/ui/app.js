/*
 * Berth desktop dashboard (Tauri 2 frontend). Plain ES2020, no dependencies.
 * Talks to the Rust side only through window.__TAURI__.core.invoke and
 * window.__TAURI__.event.listen; renders the VM status, live charts, the
 * container / image / volume lists, a container log pane and the settings.
 */
'use strict';

const OVERVIEW_POLL_MS = 2000;
const CONTAINERS_POLL_MS = 3000;
const MAX_SAMPLES = 90;
const MAX_LOG_LINES = 5000;
const VIEWS = ['overview', 'containers', 'images', 'volumes', 'settings'];

let currentView = 'overview';

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */
/* ------------------------------------------------------------------ */

const $ = (id) => document.getElementById(id);

/** Creates an element; props: class, text, any attribute (true → empty attribute). */
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value == null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function setText(node, text) {
  const value = text == null ? '' : String(text);
  if (node.textContent !== value) node.textContent = value;
}

function errorText(err) {
  if (typeof err === 'string') return err;
  if (err && typeof err.message === 'string') return err.message;
  try { return JSON.stringify(err); } catch (_) { return String(err); }
}

function isVisible() {
  return document.visibilityState !== 'hidden';
}

function formatMiB(mib) {
  if (mib == null || !Number.isFinite(mib)) return '—';
  if (mib >= 1024) return `${(mib / 1024).toFixed(mib >= 100 * 1024 ? 0 : 1)} GiB`;
  return `${Math.round(mib)} MiB`;
}

function formatPercent(value) {
  if (value == null || !Number.isFinite(value)) return '—';
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} %`;
}

function formatUptime(secs) {
  const s = Math.max(0, Math.floor(secs));
  if (s < 60) return `up ${s} s`;
  const min = Math.floor(s / 60);
  if (min < 60) return `up ${min} min`;
  const h = Math.floor(min / 60);
  if (h < 24) return min % 60 ? `up ${h} h ${min % 60} min` : `up ${h} h`;
  const d = Math.floor(h / 24);
  return h % 24 ? `up ${d} d ${h % 24} h` : `up ${d} d`;
}

/** created_secs is taken as seconds since the Unix epoch (docker's "Created"). */
function formatAge(epochSecs) {
  if (epochSecs == null || !Number.isFinite(epochSecs)) return '—';
  const age = Date.now() / 1000 - epochSecs;
  if (age < 60) return 'just now';
  const units = [[365 * 86400, 'year'], [30 * 86400, 'month'], [7 * 86400, 'week'], [86400, 'day'], [3600, 'hour'], [60, 'minute']];
  for (const [size, name] of units) {
    if (age >= size) {
      const n = Math.floor(age / size);
      return `${n} ${name}${n === 1 ? '' : 's'} ago`;
    }
  }
  return 'just now';
}

function shortId(id) {
  return String(id || '').replace(/^sha256:/, '').slice(0, 12);
}

/* ------------------------------------------------------------------ */
/* Tauri bridge                                                        */
/* ------------------------------------------------------------------ */

function invoke(cmd, args) {
  const api = window.__TAURI__;
  if (!api || !api.core || typeof api.core.invoke !== 'function') {
    return Promise.reject('The Berth app API is not available: this page only works inside the Berth desktop app.');
  }
  try {
    return Promise.resolve(api.core.invoke(cmd, args || {}));
  } catch (err) {
    return Promise.reject(err);
  }
}

function listen(name, handler) {
  const api = window.__TAURI__;
  if (!api || !api.event || typeof api.event.listen !== 'function') return;
  const safe = (event) => {
    try { handler(event ? event.payload : undefined); } catch (err) { showError(err); }
  };
  try {
    Promise.resolve(api.event.listen(name, safe)).catch(() => {});
  } catch (_) { /* no event bridge: the polls still keep the page current */ }
}

/**
 * A poll that never overlaps itself: run() now (or right after the call in
 * flight), then again every intervalMs while shouldRun() holds.
 */
function makePoller(task, intervalMs, shouldRun) {
  let timer = 0;
  let inFlight = false;
  let again = false;
  const poller = {
    run() {
      if (inFlight) { again = true; return; }
      clearTimeout(timer);
      inFlight = true;
      Promise.resolve().then(task).catch(showError).finally(() => {
        inFlight = false;
        if (again) { again = false; poller.run(); } else poller.schedule();
      });
    },
    schedule() {
      clearTimeout(timer);
      if (shouldRun()) timer = setTimeout(poller.run, intervalMs);
    },
    stop() { clearTimeout(timer); },
  };
  return poller;
}

/* ------------------------------------------------------------------ */
/* Error banner                                                        */
/* ------------------------------------------------------------------ */

function showError(err) {
  const text = errorText(err);
  if (!text) return;
  $('error-text').textContent = text;
  $('error').hidden = false;
}

function clearError() {
  $('error-text').textContent = '';
  $('error').hidden = true;
}

/* ------------------------------------------------------------------ */
/* VM status and lifecycle buttons                                     */
/* ------------------------------------------------------------------ */

const status = { state: null, uptimeBase: null, busy: false };

const ALLOWED_IN = {
  start: ['stopped', 'crashed', 'absent'],
  stop: ['starting', 'running'],
  restart: ['running', 'crashed'],
};

function setState(state, reason, sinceMs, uptimeSecs) {
  const wasRunning = status.state === 'running';
  status.state = state;
  const pill = $('state');
  setText(pill, state);
  pill.className = `pill state-${state}`;
  setText($('reason'), reason || '');
  $('reason').title = reason || '';
  status.uptimeBase = uptimeBaseFor(state, sinceMs, uptimeSecs, wasRunning);
  renderUptime();
  updateLifecycleButtons();
}

function uptimeBaseFor(state, sinceMs, uptimeSecs, wasRunning) {
  if (state !== 'running') return null;
  const now = Date.now();
  if (uptimeSecs != null && Number.isFinite(uptimeSecs)) return { secs: uptimeSecs, at: now };
  if (sinceMs != null && Number.isFinite(sinceMs)) return { secs: (now - sinceMs) / 1000, at: now };
  return wasRunning ? status.uptimeBase : null;
}

function renderUptime() {
  const base = status.uptimeBase;
  const text = base ? formatUptime(base.secs + (Date.now() - base.at) / 1000) : '';
  setText($('uptime'), text);
}

function updateLifecycleButtons() {
  for (const cmd of Object.keys(ALLOWED_IN)) {
    $(`btn-${cmd}`).disabled = status.busy || !ALLOWED_IN[cmd].includes(status.state);
  }
  for (const btn of document.querySelectorAll('#problem-actions button[data-action="start"], #problem-actions button[data-action="restart"]')) {
    btn.disabled = status.busy;
  }
  $('restart-now').disabled = status.busy;
}

/** Runs start / stop / restart; resolves true when the command was accepted. */
async function lifecycle(cmd) {
  if (status.busy) return false;
  status.busy = true;
  updateLifecycleButtons();
  try {
    await invoke(cmd);
    return true;
  } catch (err) {
    showError(err);
    return false;
  } finally {
    status.busy = false;
    updateLifecycleButtons();
    overviewPoller.run();
  }
}

/* ------------------------------------------------------------------ */
/* Problem panel                                                       */
/* ------------------------------------------------------------------ */

const PROBLEM_LABELS = { start: 'Start', restart: 'Restart', open_logs: 'Open Logs', diagnose: 'Diagnostics', retry: 'Retry' };
let problemSignature = '';

function renderProblem(problem) {
  const box = $('problem');
  if (!problem) {
    box.hidden = true;
    problemSignature = '';
    return;
  }
  const signature = JSON.stringify(problem);
  if (signature === problemSignature) return; // unchanged: keep the buttons (focus, hover)
  problemSignature = signature;
  setText($('problem-title'), problem.title || 'Something is wrong');
  setText($('problem-detail'), problem.detail || '');
  const actions = (problem.actions || []).filter((a) => PROBLEM_LABELS[a]);
  $('problem-actions').replaceChildren(...actions.map((action, i) =>
    el('button', { type: 'button', class: i === 0 ? 'btn primary' : 'btn', 'data-action': action, text: PROBLEM_LABELS[action] })));
  box.hidden = false;
  updateLifecycleButtons();
}

function onProblemAction(action) {
  if (action === 'start' || action === 'restart') lifecycle(action);
  else if (action === 'open_logs') invoke('open_logs').catch(showError);
  else if (action === 'diagnose') { showView('settings'); runDiagnose(); }
  else if (action === 'retry') overviewPoller.run();
}

/* ------------------------------------------------------------------ */
/* Overview: samples, figures, charts, ports                           */
/* ------------------------------------------------------------------ */

const samples = [];

const overviewPoller = makePoller(loadOverview, OVERVIEW_POLL_MS, isVisible);

async function loadOverview() {
  let data;
  try {
    data = await invoke('overview');
  } catch (err) {
    renderProblem({ title: 'Cannot reach Berth', detail: errorText(err), actions: ['retry'] });
    return;
  }
  applyOverview(data || {});
}

function applyOverview(o) {
  setState(o.state || 'absent', o.reason, o.since_ms, o.uptime_secs);
  setText($('version'), o.version || '');
  renderProblem(o.problem || null);
  addSample(o);
  renderFigures(o);
  drawCharts();
  renderOverviewPorts(o.ports || []);
}

function addSample(o) {
  const sample = {
    at: Date.now(),
    cpu: numberOrNull(o.cpu_percent),
    memUsed: numberOrNull(o.guest_memory && o.guest_memory.used_mib),
    memTotal: numberOrNull(o.guest_memory && o.guest_memory.total_mib),
    rss: numberOrNull(o.host_rss && o.host_rss.total_mib),
    diskUsed: numberOrNull(o.disk && o.disk.used_mib),
    diskTotal: numberOrNull(o.disk && o.disk.total_mib),
  };
  const last = samples[samples.length - 1];
  // Extra refreshes (events, actions) replace the newest sample instead of crowding the time axis.
  if (last && sample.at - last.at < 1000) samples[samples.length - 1] = sample;
  else samples.push(sample);
  if (samples.length > MAX_SAMPLES) samples.splice(0, samples.length - MAX_SAMPLES);
}

function numberOrNull(v) {
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

function renderFigures(o) {
  setText($('cpu-now'), formatPercent(numberOrNull(o.cpu_percent)));
  renderMemoryFigures(o.guest_memory, o.host_rss);
  renderDiskFigure(o.disk);
}

function renderMemoryFigures(mem, rss) {
  setText($('memory-now'), mem ? `${formatMiB(mem.used_mib)} of ${formatMiB(mem.total_mib)}` : '—');
  setText($('legend-guest'), mem ? formatMiB(mem.used_mib) : '—');
  setText($('legend-rss'), rss ? formatMiB(rss.total_mib) : '—');
  const procs = (rss && rss.processes) || [];
  const breakdown = procs.map((p) => `${p.name} ${formatMiB(p.mib)}`).join(' · ');
  $('legend-rss-item').title = breakdown;
  setText($('rss-processes'), breakdown ? `Berth's host processes: ${breakdown}` : '');
}

function renderDiskFigure(disk) {
  if (!disk || !disk.total_mib) {
    setText($('disk-now'), '—');
    setText($('disk-foot'), 'used of total');
    return;
  }
  const pct = Math.round((disk.used_mib / disk.total_mib) * 100);
  setText($('disk-now'), `${formatMiB(disk.used_mib)} of ${formatMiB(disk.total_mib)}`);
  setText($('disk-foot'), `${pct} % used`);
}

/* -- charts -- */

function drawCharts() {
  if (currentView !== 'overview') return;
  const colors = chartColors();
  const pick = (key) => samples.map((s) => s[key]);

  const cpu = pick('cpu');
  const cpuMax = Math.max(100, Math.ceil(maxOf(cpu) / 100) * 100);
  drawChart($('chart-cpu'), [{ values: cpu, color: colors.cpu, fill: true }], cpuMax, (v) => `${Math.round(v)}%`, colors);

  const mem = pick('memUsed');
  const rss = pick('rss');
  const memMax = Math.max(latestOf('memTotal'), maxOf(mem), maxOf(rss)) || 1024;
  drawChart($('chart-memory'), [
    { values: mem, color: colors.mem, fill: true },
    { values: rss, color: colors.rss, fill: false },
  ], memMax, formatMiB, colors);

  const disk = pick('diskUsed');
  const diskMax = latestOf('diskTotal') || maxOf(disk) * 1.25 || 1024;
  drawChart($('chart-disk'), [{ values: disk, color: colors.disk, fill: true }], diskMax, formatMiB, colors);
}

function maxOf(values) {
  let max = 0;
  for (const v of values) if (v != null && v > max) max = v;
  return max;
}

function latestOf(key) {
  for (let i = samples.length - 1; i >= 0; i--) if (samples[i][key] != null) return samples[i][key];
  return 0;
}

function chartColors() {
  const css = getComputedStyle(document.documentElement);
  const v = (name) => css.getPropertyValue(name).trim();
  return {
    cpu: v('--chart-cpu'), mem: v('--chart-mem'), rss: v('--chart-rss'), disk: v('--chart-disk'),
    grid: v('--chart-grid'), muted: v('--muted'),
  };
}

/** Sizes the canvas backing store for the device pixel ratio; null when not laid out. */
function prepareCanvas(canvas) {
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return null;
  const dpr = window.devicePixelRatio || 1;
  const pw = Math.round(w * dpr);
  const ph = Math.round(h * dpr);
  if (canvas.width !== pw || canvas.height !== ph) { canvas.width = pw; canvas.height = ph; }
  const ctx = canvas.getContext('2d');
  if (!ctx) return null;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function drawChart(canvas, series, maxY, label, colors) {
  const surface = prepareCanvas(canvas);
  if (!surface) return;
  const { ctx, w, h } = surface;
  const area = { left: 1, right: w - 1, top: 14, bottom: h - 2 };
  drawGrid(ctx, area, maxY, label, colors);

  const hasData = series.some((s) => s.values.some((v) => v != null));
  if (!hasData) {
    drawNoData(ctx, area, colors);
    return;
  }
  const step = (area.right - area.left) / (MAX_SAMPLES - 1);
  const x = (i, n) => area.right - (n - 1 - i) * step;
  const y = (v) => area.top + (area.bottom - area.top) * (1 - Math.min(Math.max(v, 0), maxY) / maxY);
  for (const s of series) {
    const n = s.values.length;
    drawSeries(ctx, segments(s.values, (i) => x(i, n), y), s.color, s.fill, area.bottom);
  }
}

function drawGrid(ctx, area, maxY, label, colors) {
  ctx.lineWidth = 1;
  ctx.strokeStyle = colors.grid;
  ctx.fillStyle = colors.muted;
  ctx.font = '10px -apple-system, "Segoe UI", system-ui, sans-serif';
  ctx.textAlign = 'right';
  ctx.textBaseline = 'bottom';
  for (const f of [0, 0.5, 1]) {
    const y = Math.round(area.top + (area.bottom - area.top) * (1 - f)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(area.left, y);
    ctx.lineTo(area.right, y);
    ctx.stroke();
    if (f > 0) ctx.fillText(label(maxY * f), area.right - 2, y - 2);
  }
}

function drawNoData(ctx, area, colors) {
  ctx.fillStyle = colors.muted;
  ctx.font = '12px -apple-system, "Segoe UI", system-ui, sans-serif';
  ctx.textAlign = 'center';
  ctx.textBaseline = 'middle';
  ctx.fillText('no data', (area.left + area.right) / 2, (area.top + area.bottom) / 2);
}

/** Splits values into runs of points, breaking at nulls (e.g. while the VM is stopped). */
function segments(values, xOf, yOf) {
  const runs = [];
  let run = null;
  values.forEach((v, i) => {
    if (v == null) { run = null; return; }
    if (!run) { run = []; runs.push(run); }
    run.push([xOf(i), yOf(v)]);
  });
  return runs;
}

function drawSeries(ctx, runs, color, fill, baseY) {
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.lineWidth = 1.6;
  ctx.lineJoin = 'round';
  for (const run of runs) {
    if (fill && run.length > 1) {
      ctx.beginPath();
      ctx.moveTo(run[0][0], baseY);
      for (const [px, py] of run) ctx.lineTo(px, py);
      ctx.lineTo(run[run.length - 1][0], baseY);
      ctx.closePath();
      ctx.globalAlpha = 0.14;
      ctx.fill();
      ctx.globalAlpha = 1;
    }
    ctx.beginPath();
    run.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
    ctx.stroke();
  }
  const lastRun = runs[runs.length - 1];
  if (lastRun) {
    const [px, py] = lastRun[lastRun.length - 1];
    ctx.beginPath();
    ctx.arc(px - 1, py, 2.5, 0, Math.PI * 2);
    ctx.fill();
  }
}

/* -- published ports -- */

let portsSignature = '';

function renderOverviewPorts(ports) {
  const signature = JSON.stringify(ports);
  if (signature === portsSignature) return;
  portsSignature = signature;
  const list = $('ports');
  if (!ports.length) {
    list.replaceChildren(el('li', { class: 'muted', text: 'No published ports.' }));
    return;
  }
  list.replaceChildren(...ports.map((p) => el('li', null,
    portNode(`${p.host_port}→${p.container_port}/${p.proto}`, overviewPortUrl(p)),
    el('span', { class: 'muted small', text: `${p.host_ip || '*'}:${p.host_port} → ${p.container_ip || '?'}:${p.container_port}` }))));
}

/** A browsable URL for a TCP port from `overview` (which carries no url of its own). */
function overviewPortUrl(p) {
  if ((p.proto || 'tcp').toLowerCase() !== 'tcp' || p.host_port == null) return null;
  let host = p.host_ip || '';
  if (!host || ['0.0.0.0', '::', '127.0.0.1', '::1'].includes(host)) host = 'localhost';
  else if (host.includes(':')) host = `[${host}]`;
  return `http://${host}:${p.host_port}`;
}

function portNode(label, url) {
  if (!url) return el('span', { class: 'port-plain', text: label });
  return el('a', { class: 'port-link', href: '#', 'data-url': url, title: url, text: label });
}

/* ------------------------------------------------------------------ */
/* Lists: shared table rendering and inline remove confirmation        */
/* ------------------------------------------------------------------ */

/** Shows `text` in the view instead of its table (empty list, or an error). */
function showListMessage(name, text, isError) {
  const msg = $(`${name}-message`);
  msg.textContent = text;
  msg.classList.toggle('error', !!isError);
  msg.hidden = false;
  $(name).hidden = true;
}

function showList(name) {
  $(`${name}-message`).hidden = true;
  $(name).hidden = false;
}

/** Updates rows in place, keyed, so periodic refreshes keep confirm state and focus. */
function renderRows(tbody, items, keyOf, build, update) {
  const old = new Map(Array.from(tbody.rows, (tr) => [tr.dataset.key, tr]));
  items.forEach((item, i) => {
    const key = keyOf(item);
    let tr = old.get(key);
    if (tr) old.delete(key);
    else { tr = build(item); tr.dataset.key = key; }
    update(tr, item);
    const at = tbody.rows[i];
    if (at !== tr) tbody.insertBefore(tr, at || null);
  });
  old.forEach((tr) => tr.remove());
}

function actionsCell(buttons) {
  const normal = el('div', { class: 'row-actions' }, ...buttons.map(([action, label]) =>
    el('button', { type: 'button', class: action === 'remove' ? 'btn small danger-text' : 'btn small', 'data-action': action, text: label })));
  const confirm = el('div', { class: 'row-confirm', hidden: true },
    el('span', { text: 'Remove?' }),
    el('button', { type: 'button', class: 'btn small danger', 'data-action': 'confirm-remove', text: 'Remove' }),
    el('button', { type: 'button', class: 'btn small', 'data-action': 'cancel-remove', text: 'Cancel' }));
  return el('td', { class: 'actions' }, normal, confirm);
}

function setConfirming(tr, on) {
  tr.classList.toggle('confirming', on);
  tr.querySelector('.row-actions').hidden = on;
  tr.querySelector('.row-confirm').hidden = !on;
  if (on) tr.querySelector('button[data-action="cancel-remove"]').focus();
}

/** Delegated clicks for a list table; handler(tr, action) gets "remove" only once confirmed. */
function onRowAction(tableId, handler) {
  $(tableId).addEventListener('click', (event) => {
    const btn = event.target.closest('button[data-action]');
    const tr = btn && btn.closest('tr');
    if (!tr || btn.disabled) return;
    const action = btn.dataset.action;
    if (action === 'remove') setConfirming(tr, true);
    else if (action === 'cancel-remove') setConfirming(tr, false);
    else handler(tr, action === 'confirm-remove' ? 'remove' : action);
  });
}

/** Runs one row's command with its buttons disabled, then refreshes the list. */
async function runRowAction(tr, call, afterwards) {
  tr.classList.add('busy');
  for (const b of tr.querySelectorAll('button')) b.disabled = true;
  try {
    await call();
  } catch (err) {
    showError(err);
  } finally {
    tr.classList.remove('busy');
    setConfirming(tr, false);
    afterwards(tr);
  }
}

function enableRowButtons(tr) {
  for (const b of tr.querySelectorAll('button')) b.disabled = false;
}

/* ------------------------------------------------------------------ */
/* Containers                                                          */
/* ------------------------------------------------------------------ */

const containersPoller = makePoller(loadContainers, CONTAINERS_POLL_MS,
  () => isVisible() && currentView === 'containers');

async function loadContainers() {
  let list;
  try {
    list = await invoke('containers');
  } catch (err) {
    showListMessage('containers', errorText(err), true);
    return;
  }
  renderContainers(list || []);
}

function renderContainers(list) {
  const tbody = $('containers').tBodies[0];
  if (!list.length) {
    tbody.replaceChildren();
    showListMessage('containers', 'No containers. Run one with docker run …, for example: docker run -d -p 8080:80 nginx', false);
    return;
  }
  showList('containers');
  renderRows(tbody, list, (c) => c.id, buildContainerRow, updateContainerRow);
}

function buildContainerRow() {
  return el('tr', null,
    el('td', { class: 'c-name clip' }),
    el('td', { class: 'c-image clip' }),
    el('td', { class: 'c-state' }, el('span', { class: 'cstate' })),
    el('td', { class: 'c-status' }),
    el('td', { class: 'c-ports' }, el('div', { class: 'ports-cell' })),
    actionsCell([['start', 'Start'], ['stop', 'Stop'], ['restart', 'Restart'], ['logs', 'Logs'], ['remove', 'Remove']]));
}

function updateContainerRow(tr, c) {
  tr.dataset.id = c.id;
  tr.dataset.name = c.name;
  tr.dataset.state = c.state;
  const [nameCell, imageCell, stateCell, statusCell, portsCell] = tr.cells;
  setText(nameCell, c.name);
  nameCell.title = `${c.name}\n${c.id}`;
  setText(imageCell, c.image);
  imageCell.title = c.image || '';
  const pill = stateCell.firstChild;
  setText(pill, c.state);
  pill.className = `cstate cstate-${c.state}`;
  setText(statusCell, c.status);
  renderContainerPorts(portsCell.firstChild, c.ports || []);
  updateContainerButtons(tr);
}

function renderContainerPorts(box, ports) {
  const signature = JSON.stringify(ports);
  if (box.dataset.sig === signature) return;
  box.dataset.sig = signature;
  box.replaceChildren(...ports.map((p) => portNode(
    p.host_port != null ? `${p.host_port}→${p.container_port}/${p.proto}` : `${p.container_port}/${p.proto}`,
    p.url)));
  if (!ports.length) box.append(el('span', { class: 'muted', text: '—' }));
}

function updateContainerButtons(tr) {
  if (tr.classList.contains('busy')) return;
  const running = tr.dataset.state === 'running';
  for (const btn of tr.querySelectorAll('button[data-action]')) {
    const action = btn.dataset.action;
    btn.disabled = (action === 'start' && running) || ((action === 'stop' || action === 'restart') && !running);
  }
}

function onContainerAction(tr, action) {
  const id = tr.dataset.id;
  if (action === 'logs') {
    openLogs(id, tr.dataset.name);
    return;
  }
  runRowAction(tr, () => invoke('container_action', { id, action }), (row) => {
    updateContainerButtons(row);
    containersPoller.run();
  });
}

/* ------------------------------------------------------------------ */
/* Container logs                                                      */
/* ------------------------------------------------------------------ */

const logs = { id: null, ended: true, queue: [], timer: 0 };

function logsPre() {
  return $('logs').querySelector('pre');
}

function openLogs(id, name) {
  if (logs.id === id && !logs.ended) { $('logs').hidden = false; return; }
  stopFollowing();
  resetLogQueue();
  logs.id = id;
  logs.ended = false;
  setText($('logs-title'), `Logs: ${name || shortId(id)}`);
  setText($('logs-status'), 'following');
  logsPre().replaceChildren();
  $('logs').hidden = false;
  if ($('logs').scrollIntoView) $('logs').scrollIntoView({ block: 'nearest' });
  invoke('follow_logs', { id }).catch((err) => {
    if (logs.id !== id) return;
    logs.ended = true;
    setText($('logs-status'), '');
    queueLogLine(errorText(err), 'notice');
  });
}

function stopFollowing() {
  if (logs.id && !logs.ended) invoke('stop_logs', { id: logs.id }).catch(() => {});
  logs.ended = true;
}

function closeLogs() {
  stopFollowing();
  resetLogQueue();
  logs.id = null;
  $('logs').hidden = true;
}

function resetLogQueue() {
  clearTimeout(logs.timer);
  logs.timer = 0;
  logs.queue = [];
}

function onLogLine(payload) {
  if (!payload || payload.id !== logs.id) return;
  queueLogLine(payload.line, payload.stream === 'stderr' ? 'stderr' : '');
}

function onLogEnd(payload) {
  if (!payload || payload.id !== logs.id) return;
  logs.ended = true;
  setText($('logs-status'), 'ended');
  queueLogLine(payload.message || 'The log stream ended.', 'notice');
}

/** Lines are batched so a chatty container does not re-layout the page per line. */
function queueLogLine(line, kind) {
  // Strip terminal colour codes and a trailing carriage return.
  const text = String(line == null ? '' : line).replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r$/, '');
  logs.queue.push([text, kind]);
  if (logs.queue.length > MAX_LOG_LINES) logs.queue.splice(0, logs.queue.length - MAX_LOG_LINES);
  if (!logs.timer) logs.timer = setTimeout(flushLogs, 40);
}

function flushLogs() {
  logs.timer = 0;
  const pre = logsPre();
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
  const fragment = document.createDocumentFragment();
  for (const [text, kind] of logs.queue) {
    fragment.append(el('span', { class: kind || null, text: `${text}\n` }));
  }
  logs.queue = [];
  pre.append(fragment);
  for (let extra = pre.childElementCount - MAX_LOG_LINES; extra > 0; extra--) pre.firstElementChild.remove();
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

/* ------------------------------------------------------------------ */
/* Images and volumes                                                  */
/* ------------------------------------------------------------------ */

async function loadImages() {
  let list;
  try {
    list = (await invoke('images')) || [];
  } catch (err) {
    showListMessage('images', errorText(err), true);
    return;
  }
  const tbody = $('images').tBodies[0];
  if (!list.length) {
    tbody.replaceChildren();
    showListMessage('images', 'No images. Pull one with docker pull …', false);
    return;
  }
  showList('images');
  renderRows(tbody, list, (img) => img.id, buildImageRow, updateImageRow);
}

function buildImageRow() {
  return el('tr', null,
    el('td', { class: 'clip' }), el('td', { class: 'id-text' }), el('td', { class: 'nowrap' }),
    el('td', { class: 'nowrap' }), actionsCell([['remove', 'Remove']]));
}

function updateImageRow(tr, img) {
  tr.dataset.id = img.id;
  const [tagsCell, idCell, sizeCell, createdCell] = tr.cells;
  const tags = (img.tags || []).filter((t) => t && t !== '<none>:<none>');
  setText(tagsCell, tags.length ? tags.join(', ') : '<none>');
  tagsCell.classList.toggle('none-tag', !tags.length);
  tagsCell.title = tags.join('\n');
  setText(idCell, shortId(img.id));
  idCell.title = img.id;
  setText(sizeCell, formatMiB(img.size_mib));
  setText(createdCell, formatAge(img.created_secs));
}

async function loadVolumes() {
  let list;
  try {
    list = (await invoke('volumes')) || [];
  } catch (err) {
    showListMessage('volumes', errorText(err), true);
    return;
  }
  const tbody = $('volumes').tBodies[0];
  if (!list.length) {
    tbody.replaceChildren();
    showListMessage('volumes', 'No volumes.', false);
    return;
  }
  showList('volumes');
  renderRows(tbody, list, (v) => v.name, buildVolumeRow, updateVolumeRow);
}

function buildVolumeRow() {
  return el('tr', null,
    el('td', { class: 'clip c-name' }), el('td', { class: 'nowrap' }), el('td', { class: 'clip id-text' }),
    actionsCell([['remove', 'Remove']]));
}

function updateVolumeRow(tr, v) {
  tr.dataset.name = v.name;
  const [nameCell, driverCell, mountCell] = tr.cells;
  setText(nameCell, v.name);
  nameCell.title = v.name;
  setText(driverCell, v.driver);
  setText(mountCell, v.mountpoint);
  mountCell.title = v.mountpoint || '';
}

function onImageAction(tr, action) {
  if (action !== 'remove') return;
  runRowAction(tr, () => invoke('remove_image', { id: tr.dataset.id }), (row) => {
    enableRowButtons(row);
    loadImages().catch(showError);
  });
}

function onVolumeAction(tr, action) {
  if (action !== 'remove') return;
  runRowAction(tr, () => invoke('remove_volume', { name: tr.dataset.name }), (row) => {
    enableRowButtons(row);
    loadVolumes().catch(showError);
  });
}

/* ------------------------------------------------------------------ */
/* Settings                                                            */
/* ------------------------------------------------------------------ */

const normalizeShares = (text) => text.split(',').map((s) => s.trim()).filter(Boolean).join(',');
const sharesText = (shares) => (shares || []).map((s) => (s.read_only ? `${s.path}:ro` : s.path)).join(',');
const asText = (v) => (v == null ? '' : String(v));

const SETTING_FIELDS = [
  { key: 'cpus', input: 'set-cpus', read: (s) => asText(s.cpus) },
  { key: 'memory_mib', input: 'set-memory', read: (s) => asText(s.memory_mib) },
  { key: 'disk_size_gib', input: 'set-disk', read: (s) => asText(s.disk_size_gib) },
  // The defaults, while they apply, are in the field as a list: clearing it shares nothing.
  { key: 'shares', input: 'set-shares', read: (s) => sharesText(s.shares), normalize: normalizeShares },
  { key: 'bind_address', input: 'set-bind', read: (s) => asText(s.bind_address) },
];

// Words a save_settings error may use for each field, to outline the right input.
const FIELD_WORDS = [['set-cpus', 'cpu'], ['set-memory', 'memory'], ['set-disk', 'disk'], ['set-shares', 'share'], ['set-bind', 'bind']];

const settingsState = { loaded: false, original: {} };

function fieldValue(field, raw) {
  const text = String(raw).trim();
  return field.normalize ? field.normalize(text) : text;
}

/** The fields whose input differs from the loaded config, as the strings to send. */
function changedSettings() {
  const changes = {};
  for (const f of SETTING_FIELDS) {
    const value = fieldValue(f, $(f.input).value);
    if (value !== settingsState.original[f.key]) changes[f.key] = value;
  }
  return changes;
}

async function loadSettings(keepEdits) {
  let s;
  try {
    s = await invoke('settings');
  } catch (err) {
    setSettingsMessage(errorText(err), true);
    return;
  }
  applySettings(s || {}, keepEdits);
}

/** Fills the form; with keepEdits, inputs the user has edited keep what they typed. */
function applySettings(s, keepEdits) {
  for (const f of SETTING_FIELDS) {
    const input = $(f.input);
    const value = f.read(s);
    const edited = settingsState.loaded && fieldValue(f, input.value) !== settingsState.original[f.key];
    if (!keepEdits || !edited) input.value = value;
    settingsState.original[f.key] = fieldValue(f, value);
  }
  $('set-shares').placeholder = 'Nothing shared';
  setText($('shares-hint'), s.shares_default
    ? 'These are the defaults (your home and temporary folders): edit the list to choose your own, clear it to share nothing.'
    : 'Clear the field to share nothing.');
  $('shares-use-default').hidden = !!s.shares_default;
  setCheckbox('set-autostart', s.autostart);
  setCheckbox('set-quit-stops', s.quit_stops_vm);
  setText($('config-path'), s.config_path || '—');
  settingsState.loaded = true;
  $('settings-save').disabled = false;
}

function setCheckbox(id, on) {
  const box = $(id);
  box.checked = !!on;
  box.disabled = false;
}

function setSettingsMessage(text, isError) {
  const msg = $('settings-message');
  msg.textContent = text || '';
  msg.classList.toggle('error', !!isError && !!text);
  msg.classList.toggle('success', !isError && !!text);
}

function clearFieldErrors() {
  for (const [id] of FIELD_WORDS) {
    $(id).classList.remove('invalid');
    $(id).removeAttribute('aria-invalid');
  }
}

/** Outlines the input the error message names first (best effort). */
function markFieldError(message) {
  const text = message.toLowerCase();
  let best = null;
  for (const [id, word] of FIELD_WORDS) {
    const at = text.indexOf(word);
    if (at >= 0 && (!best || at < best.at)) best = { id, at };
  }
  if (!best) return;
  $(best.id).classList.add('invalid');
  $(best.id).setAttribute('aria-invalid', 'true');
}

async function saveSettings(event) {
  event.preventDefault();
  if (!settingsState.loaded) return;
  clearFieldErrors();
  const changes = changedSettings();
  if (!Object.keys(changes).length) {
    setSettingsMessage('Nothing changed.', false);
    return;
  }
  await submitSettings(changes);
}

/** Back to the default shared folders (no `shares` in the config file); other edits wait. */
async function useDefaultShares() {
  if (!settingsState.loaded) return;
  clearFieldErrors();
  $('set-shares').value = settingsState.original.shares;
  await submitSettings({ shares_default: true });
}

/** Sends `changes` to save_settings; says what happened, then reloads the form. */
async function submitSettings(changes) {
  const btn = $('settings-save');
  btn.disabled = true;
  btn.textContent = 'Saving…';
  try {
    const result = (await invoke('save_settings', { changes })) || {};
    setSettingsMessage(result.message || 'Saved.', false);
    if (result.restart_needed) showRestartPrompt(result.message);
    else $('restart-prompt').hidden = true;
    await loadSettings(false);
  } catch (err) {
    const message = errorText(err);
    setSettingsMessage(message, true);
    markFieldError(message);
  } finally {
    btn.disabled = false;
    btn.textContent = 'Save';
  }
}

function showRestartPrompt(message) {
  setText($('restart-prompt-text'), message || 'Restart the VM to apply the new settings.');
  $('restart-prompt').hidden = false;
}

async function restartFromPrompt() {
  if (await lifecycle('restart')) $('restart-prompt').hidden = true;
}

/** A checkbox applied at once; reverted when the command rejects. */
function bindToggle(id, cmd) {
  const box = $(id);
  box.addEventListener('change', async () => {
    const on = box.checked;
    box.disabled = true;
    try {
      await invoke(cmd, { on });
    } catch (err) {
      box.checked = !on;
      showError(err);
    } finally {
      box.disabled = false;
    }
  });
}

async function runDiagnose() {
  const btn = $('diagnose');
  const out = $('diagnose-result');
  if (btn.disabled) return;
  btn.disabled = true;
  setText($('diagnose-label'), '');
  out.className = 'pending';
  out.textContent = 'Collecting…';
  try {
    const result = (await invoke('diagnose')) || {};
    setText($('diagnose-label'), 'Saved to');
    out.className = 'selectable';
    out.textContent = result.path || '';
  } catch (err) {
    out.className = 'error';
    out.textContent = errorText(err);
  } finally {
    btn.disabled = false;
  }
}

/* ------------------------------------------------------------------ */
/* Views                                                               */
/* ------------------------------------------------------------------ */

function showView(name) {
  const view = name === 'dashboard' ? 'overview' : name;
  if (!VIEWS.includes(view)) return;
  currentView = view;
  for (const v of VIEWS) {
    const on = v === view;
    $(`view-${v}`).hidden = !on;
    const tab = $(`tab-${v}`);
    tab.classList.toggle('active', on);
    tab.setAttribute('aria-selected', String(on));
  }
  onViewShown(view);
}

function onViewShown(view) {
  if (view === 'containers') containersPoller.run();
  else containersPoller.stop();
  if (view === 'overview') drawCharts();
  else if (view === 'images') loadImages().catch(showError);
  else if (view === 'volumes') loadVolumes().catch(showError);
  else if (view === 'settings') loadSettings(true).catch(showError);
}

function refreshAfterChange() {
  overviewPoller.run();
  if (currentView === 'containers') containersPoller.run();
}

/* ------------------------------------------------------------------ */
/* Wiring                                                              */
/* ------------------------------------------------------------------ */

function bindHeader() {
  for (const cmd of Object.keys(ALLOWED_IN)) $(`btn-${cmd}`).addEventListener('click', () => lifecycle(cmd));
  $('error-close').addEventListener('click', clearError);
  $('problem-actions').addEventListener('click', (event) => {
    const btn = event.target.closest('button[data-action]');
    if (btn && !btn.disabled) onProblemAction(btn.dataset.action);
  });
}

function bindTabs() {
  for (const v of VIEWS) $(`tab-${v}`).addEventListener('click', () => showView(v));
}

function bindLists() {
  onRowAction('containers', onContainerAction);
  onRowAction('images', onImageAction);
  onRowAction('volumes', onVolumeAction);
  $('containers-refresh').addEventListener('click', () => containersPoller.run());
  $('images-refresh').addEventListener('click', () => loadImages().catch(showError));
  $('volumes-refresh').addEventListener('click', () => loadVolumes().catch(showError));
  $('logs-close').addEventListener('click', closeLogs);
}

function bindSettings() {
  $('settings-form').addEventListener('submit', saveSettings);
  $('shares-use-default').addEventListener('click', useDefaultShares);
  $('settings-form').addEventListener('input', (event) => event.target.classList.remove('invalid'));
  $('restart-now').addEventListener('click', restartFromPrompt);
  $('restart-later').addEventListener('click', () => { $('restart-prompt').hidden = true; });
  bindToggle('set-autostart', 'set_autostart');
  bindToggle('set-quit-stops', 'set_quit_stops_vm');
  $('diagnose').addEventListener('click', runDiagnose);
}

/** Links never navigate the webview: port links open in the system browser. */
function bindLinks() {
  document.addEventListener('click', (event) => {
    const link = event.target.closest && event.target.closest('a');
    if (!link) return;
    event.preventDefault();
    if (link.dataset.url) invoke('open_url', { url: link.dataset.url }).catch(showError);
  });
}

function bindRedraws() {
  if (typeof ResizeObserver === 'function') {
    new ResizeObserver(() => drawCharts()).observe(document.querySelector('.charts'));
  } else {
    window.addEventListener('resize', drawCharts);
  }
  const scheme = window.matchMedia && window.matchMedia('(prefers-color-scheme: dark)');
  if (scheme && scheme.addEventListener) scheme.addEventListener('change', drawCharts);
  document.addEventListener('visibilitychange', () => {
    if (isVisible()) refreshAfterChange();
    else { overviewPoller.stop(); containersPoller.stop(); }
  });
}

function bindEvents() {
  listen('berth-state', (p) => {
    if (p && p.state) setState(p.state, p.reason, p.since_ms, null);
    refreshAfterChange();
  });
  listen('berth-port', refreshAfterChange);
  listen('show-view', (p) => showView(typeof p === 'string' ? p : p && p.view));
  // A start, stop or restart from the tray (or at launch) that failed.
  listen('berth-error', (p) => showError(p));
  listen('container-log', onLogLine);
  listen('container-log-end', onLogEnd);
}

function init() {
  bindHeader();
  bindTabs();
  bindLists();
  bindSettings();
  bindLinks();
  bindRedraws();
  bindEvents();
  showView('overview');
  overviewPoller.run();
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
else init();
