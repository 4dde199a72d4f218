// What the job page shows of a report: per TOML stage, its records (its account) and its
// thread's time shares and input queue (the run-time stage whose `+`-joined name includes it:
// stages fuse, so fused stages share one thread and show the same shares).

function runtimeRows(report, name) {
  return (report?.stages || []).filter((s) => s.stage.split('+').includes(name));
}

function sum(rows, f) {
  return rows.reduce((a, r) => a + (f(r) || 0), 0);
}

// One stage's live figures from the latest report and the one before it (rates and shares
// over the interval between them; the whole run's when there is no earlier one).
export function stageFigures(name, report, previous) {
  const acct = (report?.accounts || []).find((a) => a.stage === name);
  const prevAcct = (previous?.accounts || []).find((a) => a.stage === name);
  const rows = runtimeRows(report, name);
  const prevRows = runtimeRows(previous, name);
  const dt = previous ? report.elapsed_s - previous.elapsed_s : report?.elapsed_s || 0;
  const rate = (now, before) => (dt > 0 ? Math.max(0, (now - (before || 0)) / dt) : 0);
  const inNow = acct?.records_in ?? sum(rows, (r) => r.records_in);
  const outNow = acct?.records_out ?? sum(rows, (r) => r.records_out);
  const inBefore = previous ? prevAcct?.records_in ?? sum(prevRows, (r) => r.records_in) : 0;
  const outBefore = previous ? prevAcct?.records_out ?? sum(prevRows, (r) => r.records_out) : 0;
  const d = (f) => sum(rows, f) - (previous ? sum(prevRows, f) : 0);
  let busy = d((r) => r.busy_ms);
  let back = d((r) => r.send_blocked_ms);
  let idle = d((r) => r.recv_blocked_ms);
  if (busy + back + idle <= 0) {
    busy = sum(rows, (r) => r.busy_ms);
    back = sum(rows, (r) => r.send_blocked_ms);
    idle = sum(rows, (r) => r.recv_blocked_ms);
  }
  const total = busy + back + idle;
  const cap = sum(rows, (r) => r.queue_capacity);
  return {
    recordsIn: inNow,
    recordsOut: outNow,
    rateIn: rate(inNow, inBefore),
    rateOut: rate(outNow, outBefore),
    busy: total > 0 ? busy / total : 0,
    backpressure: total > 0 ? back / total : 0,
    idle: total > 0 ? idle / total : 0,
    queueFill: cap > 0 ? sum(rows, (r) => r.queue_len) / cap : null,
    fusedWith: rows[0]?.stage || name,
    instances: rows.length,
    skipped: acct?.skipped || 0,
    deadLettered: acct?.dead_lettered || 0,
    late: acct?.late || 0,
    filtered: acct?.filtered || 0,
  };
}

// The bottleneck. First by queues: a stage whose input queue is at least half full while no
// stage it feeds (on another thread) has one as full: it cannot keep up, and nothing
// downstream holds it back. Without such a queue: the busiest stage that is moving records
// and not itself held back (blocked sending less than a fifth of the time), when it is busy at
// least half the time. Fused stages share a thread and a queue: the first of them is marked.
export function bottleneck(figures, graph) {
  const feeds = (name) => graph.edges.filter((e) => e.from === name && e.type === 'data').map((e) => e.to);
  let best = null;
  for (const s of graph.stages) {
    const f = figures[s.name];
    if (!f || f.queueFill === null || f.queueFill < 0.5) continue;
    const held = feeds(s.name).some((d) => {
      const g = figures[d];
      return g && g.fusedWith !== f.fusedWith && (g.queueFill ?? 0) >= 0.5;
    });
    if (!held && (!best || f.queueFill > figures[best].queueFill)) best = s.name;
  }
  if (best) return best;
  for (const s of graph.stages) {
    const f = figures[s.name];
    if (!f || f.backpressure >= 0.2 || f.busy < 0.5 || (f.rateIn <= 0 && f.rateOut <= 0)) continue;
    if (!best || f.busy > figures[best].busy) best = s.name;
  }
  return best;
}

// Flink's colours for backpressure: green when none, through amber, to red when the stage
// spends all its time blocked sending.
export function backpressureColour(share) {
  const s = Math.max(0, Math.min(1, share || 0));
  const hue = 120 - 120 * s;
  return `hsl(${hue.toFixed(0)}, 70%, ${(92 - 30 * s).toFixed(0)}%)`;
}

export function fmtRate(r) {
  if (r >= 1e6) return `${(r / 1e6).toFixed(1)}M/s`;
  if (r >= 1e3) return `${(r / 1e3).toFixed(1)}k/s`;
  return `${r.toFixed(r < 10 ? 1 : 0)}/s`;
}

export function fmtPct(x) {
  return `${Math.round((x || 0) * 100)}%`;
}

export function fmtSecs(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - 60 * m)} s`;
}
