// The console's tests in Firefox: `millrace serve` (the release binary) and Debian's
// firefox-esr, headless, driven by geckodriver (built from crates.io) over its W3C WebDriver
// HTTP API with Node's own `fetch`: no npm package, so nothing that could try to download a
// driver or a browser. Run by `.ci/browser` (which installs firefox-esr and geckodriver first),
// or by hand from web/: `node tests/firefox.mjs`.
//
// As in run.mjs, every wait is on a condition in the page, with a deadline (polled inside the
// page by an async script); nothing sleeps to synchronize. Each test saves a screenshot as
// target/console-screenshots/firefox-<test>.png.
//
// Environment: MILLRACE_BIN (default ../target/release/millrace), GECKODRIVER (default
// ../target/geckodriver/bin/geckodriver, else geckodriver on the PATH), FIREFOX (default
// /usr/bin/firefox-esr), ONLY (a test name, to run one).
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { parse } from 'smol-toml';
import { api as commonApi, assert, bin, root, shots, slowPipeline as commonSlowPipeline } from './common.mjs';

const localDriver = join(root, 'target/geckodriver/bin/geckodriver');
const geckodriver = process.env.GECKODRIVER || (existsSync(localDriver) ? localDriver : 'geckodriver');
const firefox = process.env.FIREFOX || '/usr/bin/firefox-esr';
const TOKEN = `firefox-test-${process.pid}-token`;
mkdirSync(shots, { recursive: true });


// A child process that prints a line matching `re` on stderr (or stdout) when it is ready.
// After that, its output is kept in `child.later` (a string) when `keep` is set, else drained.
function startUntil(cmd, args, re, what, { keep = false, ...opts } = {}) {
  return new Promise((ok, fail) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
    child.later = '';
    let out = '';
    const timer = setTimeout(() => fail(new Error(`${what}: not ready in 20 s: ${out}`)), 20000);
    const on = (d) => {
      out += d;
      const m = out.match(re);
      if (m) {
        clearTimeout(timer);
        child.stdout.off('data', on);
        child.stderr.off('data', on);
        if (keep) {
          const later = (d) => {
            child.later += d;
          };
          child.stdout.on('data', later);
          child.stderr.on('data', later);
        }
        child.stdout.resume();
        child.stderr.resume();
        ok({ child, m });
      }
    };
    child.stdout.on('data', on);
    child.stderr.on('data', on);
    child.on('error', (e) => fail(new Error(`${what}: ${e.message}`)));
    child.on('exit', (code) => fail(new Error(`${what} exited (${code}): ${out}`)));
  });
}

const api = (base, method, path, body) => commonApi(TOKEN, base, method, path, body);

// A minimal W3C WebDriver client: the few commands the tests use.
const ELEMENT = 'element-6066-11e4-a52e-4f735466cecf';
class Session {
  constructor(driver, id) {
    this.driver = driver;
    this.id = id;
  }

  static async start(driver) {
    const r = await call(driver, 'POST', '/session', {
      capabilities: {
        alwaysMatch: {
          browserName: 'firefox',
          'moz:firefoxOptions': {
            binary: firefox,
            args: ['-headless'],
            // No connections of Firefox's own (updates, telemetry, safe browsing, captive
            // portal checks...): this machine's network is closed.
            prefs: {
              'app.update.enabled': false,
              'browser.safebrowsing.malware.enabled': false,
              'browser.safebrowsing.phishing.enabled': false,
              'datareporting.policy.dataSubmissionEnabled': false,
              'network.captive-portal-service.enabled': false,
              'network.connectivity-service.enabled': false,
              'extensions.update.enabled': false,
              'browser.shell.checkDefaultBrowser': false,
              // The page's console.error calls on Firefox's stdout, beside the uncaught errors
              // ("JavaScript error: <url>, line <n>: ...") it prints anyway: the tests read
              // them from geckodriver's output, as run.mjs listens for `pageerror`.
              'devtools.console.stdout.content': true,
            },
          },
        },
      },
    });
    const s = new Session(driver, r.sessionId);
    await s.cmd('POST', '/window/rect', { width: 1440, height: 900 });
    await s.cmd('POST', '/timeouts', { script: 30000, pageLoad: 20000, implicit: 0 });
    return s;
  }

  cmd(method, path, body) {
    return call(this.driver, method, `/session/${this.id}${path}`, body);
  }

  goto(url) {
    return this.cmd('POST', '/url', { url });
  }

  // A function of the page (its source, run with `args`).
  exec(f, ...args) {
    return this.cmd('POST', '/execute/sync', { script: `return (${f}).apply(null, arguments);`, args });
  }

  // Wait until `f(...args)` (run in the page) is truthy, polled in the page every 50 ms, for
  // at most `ms`; answers its value. On timeout, the error says what was awaited.
  async waitFor(f, args = [], ms = 5000, what = String(f)) {
    const script = `
      const done = arguments[arguments.length - 1];
      const args = Array.prototype.slice.call(arguments, 0, -1);
      const f = (${f});
      const deadline = Date.now() + ${ms};
      const poll = async () => {
        let v;
        try { v = await f.apply(null, args); } catch (e) { v = undefined; }
        if (v) return done({ ok: true, v });
        if (Date.now() > deadline) return done({ ok: false });
        setTimeout(poll, 50);
      };
      poll();`;
    const r = await this.cmd('POST', '/execute/async', { script, args });
    if (!r.ok) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    return r.v;
  }

  waitForSelector(sel, ms = 5000) {
    return this.waitFor((s) => document.querySelector(s) !== null, [sel], ms, sel);
  }

  async find(sel) {
    const r = await this.cmd('POST', '/element', { using: 'css selector', value: sel });
    return r[ELEMENT];
  }

  async click(sel) {
    await this.cmd('POST', `/element/${await this.find(sel)}/click`, {});
  }

  // Typed as keys (real key and input events), after clearing the field.
  async type(sel, text) {
    const e = await this.find(sel);
    await this.cmd('POST', `/element/${e}/clear`, {});
    await this.cmd('POST', `/element/${e}/value`, { text });
  }

  text(sel) {
    return this.exec((s) => document.querySelector(s)?.innerText, sel);
  }

  async doubleClick(sel) {
    const origin = { [ELEMENT]: await this.find(sel) };
    await this.cmd('POST', '/actions', {
      actions: [
        {
          type: 'pointer',
          id: 'mouse',
          parameters: { pointerType: 'mouse' },
          actions: [
            { type: 'pointerMove', origin, x: 0, y: 0 },
            { type: 'pointerDown', button: 0 },
            { type: 'pointerUp', button: 0 },
            { type: 'pointerDown', button: 0 },
            { type: 'pointerUp', button: 0 },
          ],
        },
      ],
    });
    await this.cmd('DELETE', '/actions');
  }

  // A mouse drag from the centre of `from` to `(x, y)` from the centre of `to`, in steps.
  async drag(from, to, x = 0, y = 0) {
    const a = { [ELEMENT]: await this.find(from) };
    const b = { [ELEMENT]: await this.find(to) };
    await this.cmd('POST', '/actions', {
      actions: [
        {
          type: 'pointer',
          id: 'mouse',
          parameters: { pointerType: 'mouse' },
          actions: [
            { type: 'pointerMove', origin: a, x: 0, y: 0 },
            { type: 'pointerDown', button: 0 },
            { type: 'pointerMove', origin: a, x: 10, y: 10, duration: 50 },
            { type: 'pointerMove', origin: b, x, y, duration: 200 },
            { type: 'pointerUp', button: 0 },
          ],
        },
      ],
    });
    await this.cmd('DELETE', '/actions');
  }

  async screenshot(path) {
    const b64 = await this.cmd('GET', '/screenshot');
    writeFileSync(path, Buffer.from(b64, 'base64'));
  }

  close() {
    return this.cmd('DELETE', '');
  }
}

async function call(driver, method, path, body) {
  const r = await fetch(driver + path, {
    method,
    headers: body === undefined ? {} : { 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await r.json();
  if (!r.ok) throw new Error(`WebDriver ${method} ${path}: ${r.status} ${json.value?.error}: ${json.value?.message}`);
  return json.value;
}

const slowPipeline = (name, lines) => commonSlowPipeline(name, lines, `console-firefox-${name}`);

const wordcount = readFileSync(join(root, 'examples/wordcount.toml'), 'utf8');

const tests = [];
const test = (name, f) => tests.push({ name, f });

// First, in a fresh profile: no cookie yet.
test('no_token_shows_the_prompt_and_no_data', async ({ s, base }) => {
  await s.goto(`${base}/#/`);
  await s.waitForSelector('#token-prompt');
  const prompt = await s.text('#token-prompt');
  assert(prompt.includes('This server needs its token'), prompt);
  assert(await s.exec(() => document.querySelector('#token-prompt input[name=token]') !== null), 'no token field');
  assert(await s.exec(() => document.querySelectorAll('table, .react-flow').length === 0), 'data without the token');
  // The page itself answered 401, and a request made by hand from it is refused.
  const statuses = await s.waitFor(
    () => Promise.all(['/', '/jobs'].map((p) => fetch(p).then((r) => r.status))),
    [],
    5000,
  );
  assert(statuses.join() === '401,401', `GET / and GET /jobs without the token: ${statuses}`);
});

test('open_with_the_token', async ({ s, base }) => {
  await s.goto(`${base}/?token=${TOKEN}#/`);
  await s.waitForSelector('.top nav a.active');
  // The token leaves the address bar; the jobs page is shown, with its (empty) list.
  await s.waitFor(() => !window.location.href.includes('token='), [], 5000, 'the token out of the URL');
  const active = await s.text('.top nav a.active');
  assert(active.trim() === 'Jobs', `active tab: ${active}`);
  const heading = await s.waitFor(() => document.querySelector('main.page h2')?.innerText, [], 5000, 'the Jobs heading');
  assert(heading === 'Jobs', heading);
  // A fresh server: no jobs yet, and the page says so.
  const empty = await s.waitFor(() => document.querySelector('main.page .empty')?.innerText, [], 5000, 'the empty list');
  assert(empty.startsWith('No jobs yet.'), empty);
  // The page's own requests carry the cookie.
  const status = await s.exec(() => fetch('/jobs').then((r) => r.status));
  assert(status === 200, `GET /jobs with the cookie: ${status}`);
});

let slowId;
test('a_running_jobs_graph_updates', async ({ s, base }) => {
  slowId = (await api(base, 'POST', '/jobs?name=slow', slowPipeline('slow', 100000))).id;
  await s.goto(`${base}/#/jobs/${slowId}`);
  await s.waitForSelector('[data-stage="slow"] .rate-out');
  await s.waitForSelector('[data-stage="read"]');
  await s.waitForSelector('[data-stage="out"]');
  // Edges are drawn once React Flow has measured the nodes: wait for them (with a deadline).
  const edges = await s.waitFor(() => document.querySelectorAll('.react-flow__edge').length === 2 && 2, [], 5000, '2 edges');
  assert(edges === 2, `${edges} edges`);
  const kind = await s.text('[data-stage="slow"]');
  assert(kind.includes('exec'), kind);
  // The count of records out changes between two reads, and so does the rate shown.
  const first = await s.text('[data-stage="slow"] .counts');
  await s.waitFor(
    (was) => document.querySelector('[data-stage="slow"] .counts')?.innerText !== was,
    [first],
    10000,
    'the counts to change',
  );
  const rate1 = await s.text('[data-stage="slow"] .rate-out');
  const rate2 = await s.waitFor(
    (was) => {
      const t = document.querySelector('[data-stage="slow"] .rate-out')?.innerText;
      return t !== was && t !== 'out 0.0/s' && t;
    },
    [rate1],
    10000,
    'the rate to change',
  );
  assert(/^out [\d.]+\/s$/.test(rate2), rate2);
  const share = await s.text('[data-stage="slow"] .share-text');
  assert(/busy \d+%/.test(share), share);
  const status = await s.exec(() => document.querySelector('[data-testid="job-page"]').dataset.status);
  assert(status === 'running', status);
});

test('cancel_a_job_from_the_jobs_list', async ({ s, base }) => {
  await s.goto(`${base}/#/`);
  await s.waitForSelector(`tr[data-job="${slowId}"] button.cancel`);
  await s.click(`tr[data-job="${slowId}"] button.cancel`);
  await s.waitForSelector(`tr[data-job="${slowId}"][data-status="cancelled"]`, 10000);
  const job = await api(base, 'GET', `/jobs/${slowId}`);
  assert(job.status === 'cancelled', job.status);
});

test('editor_palette_import_export', async ({ s, base }) => {
  await s.goto(`${base}/#/editor`);
  await s.waitForSelector('.palette-item[data-kind="lines.read"]');
  const groups = await s.exec(() =>
    [...document.querySelectorAll('.palette-group')].map((g) => ({
      category: g.dataset.category,
      heading: g.querySelector('h4')?.innerText,
      kinds: [...g.querySelectorAll('.palette-item')].map((i) => i.dataset.kind),
    })),
  );
  const cats = groups.map((g) => g.category);
  assert(['source', 'transform', 'aggregate', 'process', 'sink'].every((c) => cats.includes(c)), cats.join());
  const of = (c) => groups.find((g) => g.category === c).kinds;
  assert(of('source').includes('lines.read') && of('sink').includes('ndjson.write'), JSON.stringify(groups));
  assert(of('transform').includes('words') && of('aggregate').includes('count'), JSON.stringify(groups));
  const desc = await s.text('.palette-item[data-kind="lines.read"] .palette-desc');
  assert(desc.length > 10, `description of lines.read: ${desc}`);

  // A stage from the palette by double-click.
  await s.doubleClick('.palette-item[data-kind="lines.read"]');
  await s.waitForSelector('[data-testid="node-read"]');
  const missing = await s.text('[data-testid="node-read"] .missing');
  assert(missing.includes('path'), missing);

  // Import examples/wordcount.toml (typed into the import field) and export it unchanged.
  await s.click('[data-testid="import-open"]');
  await s.type('[data-testid="import-text"]', wordcount);
  const typed = await s.exec(() => document.querySelector('[data-testid="import-text"]').value);
  assert(typed === wordcount, `the import field holds:\n${typed}`);
  await s.click('[data-testid="import"]');
  await s.waitFor(() => document.querySelectorAll('.edit-node').length === 5, [], 5000, '5 stages');
  const banner = await s.text('[data-testid="banner"]');
  assert(banner === 'Imported 5 stages.', banner);
  const names = await s.exec(() => [...document.querySelectorAll('[data-testid^="node-"]')].map((n) => n.dataset.testid).sort());
  assert(names.join() === 'node-count,node-out,node-read,node-top,node-words', names.join());
  const edges = await s.waitFor(() => document.querySelectorAll('.react-flow__edge').length === 4 && 4, [], 5000, '4 edges');
  assert(edges === 4, `${edges} edges`);
  await s.click('[data-testid="export"]');
  const first = await s.waitFor(() => document.querySelector('[data-testid="export-text"]')?.value, [], 5000, 'the export');
  assert(isDeepStrictEqual(parse(first), parse(wordcount)), `exported:\n${first}\nis not:\n${wordcount}`);
  // import → export → import → export: the same document (Import closed its panel).
  await s.click('[data-testid="import-open"]');
  await s.waitForSelector('[data-testid="import-text"]');
  await s.type('[data-testid="import-text"]', first);
  await s.click('[data-testid="import"]');
  await s.waitFor(() => document.querySelectorAll('.edit-node').length === 5, [], 5000, '5 stages again');
  await s.click('[data-testid="export"]');
  const second = await s.exec(() => document.querySelector('[data-testid="export-text"]').value);
  assert(second === first, `second export differs:\n${second}\n---\n${first}`);
  // The server's verdict, on the page: `data/millrace.txt` is relative to the example's
  // directory, not to the server's, so Validate puts the error on the source's `path`.
  await s.click('[data-testid="validate"]');
  const err = await s.waitFor(
    () => document.querySelector('[data-testid="node-read"] .node-error[data-param="path"]')?.innerText,
    [],
    5000,
    'the path error on read',
  );
  assert(err.includes('cannot open input file'), err);
});

// Dragging from the palette is HTML5 drag and drop, which WebDriver cannot drive in Firefox:
// geckodriver's pointer actions start the drag (`dragstart`, `dragover` fire) but never drop
// (mozilla/geckodriver#1450, still so with geckodriver 0.37.1 and Firefox 153 ESR). So the drag
// events are dispatched in the page, with one DataTransfer, the way the browser would: the
// palette item's own `dragstart` handler fills it, the canvas's `dragover` and `drop` handlers
// read it (Firefox's native drag session itself is not exercised). The wire between two
// stages is React Flow's pointer events: real WebDriver mouse actions.
function dropKind(s, kind, x, y) {
  return s.exec(
    (k, dx, dy) => {
      const item = document.querySelector(`.palette-item[data-kind="${k}"]`);
      const canvas = document.querySelector('[data-testid="canvas"]');
      const r = canvas.getBoundingClientRect();
      const at = { clientX: r.left + dx, clientY: r.top + dy, bubbles: true, cancelable: true };
      const dataTransfer = new DataTransfer();
      item.dispatchEvent(new DragEvent('dragstart', { ...at, dataTransfer }));
      canvas.dispatchEvent(new DragEvent('dragover', { ...at, dataTransfer }));
      canvas.dispatchEvent(new DragEvent('drop', { ...at, dataTransfer }));
      item.dispatchEvent(new DragEvent('dragend', { ...at, dataTransfer }));
      return dataTransfer.getData('application/x-millrace-kind');
    },
    kind,
    x,
    y,
  );
}

test('editor_drop_from_the_palette_and_wire', async ({ s, base }) => {
  await s.goto(`${base}/#/editor`);
  await s.waitForSelector('.palette-item[data-kind="words"]');
  const carried = await dropKind(s, 'lines.read', 120, 200);
  assert(carried === 'lines.read', `the drag carried ${carried}`);
  await s.waitForSelector('[data-testid="node-read"]', 3000);
  // Where it was dropped: its top-left corner at the drop point (within a pixel or two).
  const at = await s.exec(() => {
    const c = document.querySelector('[data-testid="canvas"]').getBoundingClientRect();
    const n = document.querySelector('.react-flow__node:has([data-testid="node-read"])').getBoundingClientRect();
    return [Math.round(n.left - c.left), Math.round(n.top - c.top)];
  });
  assert(Math.abs(at[0] - 120) <= 2 && Math.abs(at[1] - 200) <= 2, `read dropped at ${at}`);
  await dropKind(s, 'words', 420, 200);
  await s.waitForSelector('[data-testid="node-words"]', 3000);
  const missing = await s.text('[data-testid="node-words"] .missing');
  assert(missing.includes('input'), missing);
  await s.drag(
    '.react-flow__node:has([data-testid="node-read"]) .react-flow__handle[data-handleid="out"]',
    '.react-flow__node:has([data-testid="node-words"]) .react-flow__handle[data-handleid="in"]',
  );
  await s.waitFor(() => document.querySelectorAll('.react-flow__edge').length === 1, [], 3000, 'one edge');
  await s.click('[data-testid="export"]');
  const text = await s.waitFor(() => document.querySelector('[data-testid="export-text"]')?.value, [], 5000, 'the export');
  const doc = parse(text);
  assert(doc.stages.read.kind === 'lines.read' && doc.stages.words.kind === 'words', text);
  assert(doc.stages.words.input === 'read', text);
});

const { child: server, m: sm } = await startUntil(
  bin,
  ['serve', '--listen', '127.0.0.1:0', '--token', TOKEN],
  /serving on (http:\/\/127\.0\.0\.1:\d+)\/\?token=/,
  bin,
  { cwd: root },
);
const base = sm[1];
const version = spawnSync(geckodriver, ['--version'], { encoding: 'utf8' }).stdout?.split('\n')[0];
const ffVersion = spawnSync(firefox, ['--version'], { encoding: 'utf8' }).stdout?.trim();
console.log(`    ${version}; ${ffVersion}`);
const { child: driverProc, m: dm } = await startUntil(
  geckodriver,
  // `info`: the level at which it says where it listens (the port is its choice).
  ['--port', '0', '--host', '127.0.0.1', '--log', 'info'],
  /Listening on (127\.0\.0\.1:\d+)/,
  geckodriver,
  { keep: true },
);
// The page's errors printed since the last call: uncaught errors in the console's own scripts
// and its console.error calls.
function pageErrors() {
  const lines = driverProc.later.split('\n');
  driverProc.later = lines.pop();
  return lines.filter((l) => l.startsWith(`JavaScript error: ${base}/`) || l.startsWith('console.error:'));
}
const driver = `http://${dm[1]}`;
const s = await Session.start(driver);
let failed = 0;
let ran = 0;
let signedIn = false;
const started = Date.now();
for (const t of tests) {
  if (process.env.ONLY && process.env.ONLY !== t.name) continue;
  ran += 1;
  if (!signedIn && t.name !== 'no_token_shows_the_prompt_and_no_data') {
    await s.goto(`${base}/?token=${TOKEN}`);
    signedIn = true;
  }
  // A fresh document for each test (as run.mjs's new page): the console's routes are the
  // URL's hash, so going from `#/editor` to `#/editor` would keep the page and its state.
  await s.goto('about:blank');
  pageErrors();
  const t0 = Date.now();
  try {
    await t.f({ s, base });
    const errors = pageErrors();
    assert(errors.length === 0, `errors in the page: ${errors.join('; ')}`);
    console.log(`ok   ${t.name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${t.name} (${Date.now() - t0} ms): ${e.stack || e}`);
  }
  await s.screenshot(join(shots, `firefox-${t.name}.png`)).catch((e) => console.log(`    no screenshot: ${e.message}`));
}
await s.close().catch(() => {});
driverProc.kill('SIGTERM');
server.kill('SIGTERM');
console.log(`firefox: ${ran - failed} passed, ${failed} failed in ${((Date.now() - started) / 1000).toFixed(1)} s; screenshots in ${shots}`);
process.exit(failed ? 1 : 0);
