// The console's browser tests: `millrace serve` (the release binary) and Debian's Chromium,
// driven by playwright-core (no browser download). Run by `.ci/browser` (which installs
// Chromium and the packages first), or by hand from web/: `node tests/run.mjs`.
//
// Every wait is on a selector, an event or a condition in the page, with a deadline; nothing
// sleeps to synchronize. Each test saves a screenshot under target/console-screenshots/.
//
// Environment: MILLRACE_BIN (default ../target/release/millrace), CHROMIUM (default
// /usr/bin/chromium), ONLY (a test name, to run one).
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { chromium } from 'playwright-core';
import { parse } from 'smol-toml';
import { api as commonApi, assert, bin, root, shots, slowPipeline } from './common.mjs';

const TOKEN = `browser-test-${process.pid}-token`;
mkdirSync(shots, { recursive: true });

// The server, on a free port, in the repository root (relative paths of submitted pipelines
// resolve there).
function startServer() {
  return new Promise((ok, fail) => {
    const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--token', TOKEN], {
      cwd: root,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    const timer = setTimeout(() => fail(new Error(`no URL from ${bin} in 20 s: ${err}`)), 20000);
    child.stderr.on('data', (d) => {
      err += d;
      const m = err.match(/serving on (http:\/\/127\.0\.0\.1:\d+)\/\?token=/);
      if (m) {
        clearTimeout(timer);
        ok({ child, base: m[1] });
      }
    });
    child.on('exit', (code) => fail(new Error(`${bin} exited (${code}): ${err}`)));
  });
}

const api = (base, method, path, body) => commonApi(TOKEN, base, method, path, body);



// A generated pipeline of `n` stages: a source, n - 2 filters in a chain, a sink.
function longPipeline(n) {
  let text = 'name = "long"\n\n[stages.s0]\nkind = "lines.read"\npath = "examples/data/millrace.txt"\n';
  for (let i = 1; i < n - 1; i += 1) {
    text += `\n[stages.s${i}]\nkind = "filter"\ninput = "s${i - 1}"\nfield = "line"\nop = "ne"\nvalue = "x${i}"\nparallelism = 1\n`;
  }
  text += `\n[stages.s${n - 1}]\nkind = "ndjson.write"\ninput = "s${n - 2}"\npath = "/dev/null"\n`;
  return text;
}

const wordcount = readFileSync(join(root, 'examples/wordcount.toml'), 'utf8');
const wordcountHere = wordcount.replace('data/millrace.txt', 'examples/data/millrace.txt');

const tests = [];
const test = (name, f) => tests.push({ name, f });

test('no_token_shows_the_prompt_and_no_data', async ({ page, base }) => {
  const answered = [];
  page.on('response', (r) => {
    if (new URL(r.url()).pathname !== '/') answered.push(`${r.status()} ${r.url()}`);
  });
  const r = await page.goto(`${base}/#/`);
  assert(r.status() === 401, `status ${r.status()}`);
  await page.waitForSelector('#token-prompt', { timeout: 5000 });
  assert((await page.locator('table').count()) === 0, 'a table without the token');
  // The page holds no script that could call the API; a call made by hand is refused.
  const status = await page.evaluate(async () => (await fetch('/jobs')).status);
  assert(status === 401, `GET /jobs without the token: ${status}`);
  const ok = answered.filter((a) => a.startsWith('2'));
  assert(ok.length === 0, `answered without the token: ${ok.join(', ')}`);
});

test('open_with_the_token', async ({ page, base }) => {
  await page.goto(`${base}/?token=${TOKEN}#/`);
  await page.waitForSelector('text=Jobs', { timeout: 5000 });
  await page.waitForFunction(() => !window.location.href.includes('token='), null, { timeout: 5000 });
  await page.waitForSelector('.top nav a.active', { timeout: 5000 });
});

let slowId;
test('a_running_jobs_graph_updates', async ({ page, base }) => {
  slowId = (await api(base, 'POST', '/jobs?name=slow', slowPipeline('slow', 100000))).id;
  await page.goto(`${base}/#/jobs/${slowId}`);
  await page.waitForSelector('[data-stage="slow"] .rate-out', { timeout: 5000 });
  await page.waitForSelector('[data-stage="read"]', { timeout: 5000 });
  const edges = await page.locator('.react-flow__edge').count();
  assert(edges === 2, `${edges} edges`);
  const read = () => page.locator('[data-stage="slow"] .counts').innerText();
  const first = await read();
  // The count of records out changes between two reads, and so does the rate shown.
  await page.waitForFunction(
    (was) => document.querySelector('[data-stage="slow"] .counts')?.innerText !== was,
    first,
    { timeout: 10000 },
  );
  const rate1 = await page.locator('[data-stage="slow"] .rate-out').innerText();
  await page.waitForFunction(
    (was) => {
      const t = document.querySelector('[data-stage="slow"] .rate-out')?.innerText;
      return t !== was && t !== 'out 0.0/s';
    },
    rate1,
    { timeout: 10000 },
  );
  const share = await page.locator('[data-stage="slow"] .share-text').innerText();
  assert(/busy \d+%/.test(share), share);
  const status = await page.getAttribute('[data-testid="job-page"]', 'data-status');
  assert(status === 'running', status);
});

test('cancel_a_job_from_the_page', async ({ page, base }) => {
  await page.goto(`${base}/#/`);
  const row = page.locator(`tr[data-job="${slowId}"]`);
  await row.waitFor({ timeout: 5000 });
  await row.locator('button.cancel').click();
  await page.waitForSelector(`tr[data-job="${slowId}"][data-status="cancelled"]`, { timeout: 10000 });
  const job = await api(base, 'GET', `/jobs/${slowId}`);
  assert(job.status === 'cancelled', job.status);
});

test('a_failed_job_names_its_stage_and_dead_letters_show', async ({ page, base }) => {
  // `cmp` compares a string field with a number: every record is a record error, and the
  // default policy fails the run naming the stage.
  const failing = `name = "failing"
[stages.read]
kind = "lines.read"
path = "examples/data/millrace.txt"

[stages.cmp]
kind = "filter"
input = "read"
field = "line"
op = "lt"
value = 3

[stages.out]
kind = "ndjson.write"
input = "cmp"
path = "/dev/null"
`;
  const { id } = await api(base, 'POST', '/jobs?name=failing', failing);
  await page.goto(`${base}/#/jobs/${id}`);
  const err = page.locator('[data-testid="job-error"]');
  await err.waitFor({ timeout: 10000 });
  const text = await err.innerText();
  assert(text.startsWith('Failed in stage cmp:'), text);
  assert(text.includes('not a number like 3'), text);
  await page.screenshot({ path: join(shots, 'a_failed_job_names_its_stage.png') });
  // The same with a dead-letter stage: the run succeeds, the letters are counted on the node
  // and in the report, and the dead-letter edge is drawn as such.
  const dead = failing
    .replace('name = "failing"', 'name = "dead-letters"')
    .replace('value = 3\n', 'value = 3\non_error = "dead_letter"\ndead_letter = "bad"\n')
    .concat('\n[stages.bad]\nkind = "ndjson.write"\npath = "/dev/null"\n');
  const d = (await api(base, 'POST', '/jobs?name=dead-letters', dead)).id;
  await page.goto(`${base}/#/jobs/${d}`);
  await page.waitForSelector('[data-testid="job-page"][data-status="succeeded"]', { timeout: 10000 });
  await page.waitForSelector('[data-testid="final-report"]', { timeout: 5000 });
  const letters = Number(await page.locator('tr[data-account="cmp"] td:nth-child(7)').innerText());
  assert(letters === 38, `${letters} dead letters of cmp`);
  const lost = await page.locator('[data-testid="lost-cmp"]').innerText();
  assert(lost.includes('dead letters 38'), lost);
  // React Flow draws edges only once it has measured the nodes, which can be after the final
  // report shows: wait for the edge (with a deadline) before counting.
  await page.waitForSelector('.react-flow__edge.edge-dead_letter', { timeout: 5000 });
  assert((await page.locator('.react-flow__edge.edge-dead_letter').count()) === 1, 'not one dead-letter edge');
});

async function dragKind(page, kind, x, y) {
  const canvas = await page.locator('[data-testid="canvas"]').boundingBox();
  await page.locator(`.palette-item[data-kind="${kind}"]`).dragTo(page.locator('[data-testid="canvas"]'), {
    targetPosition: { x, y },
  });
  return canvas;
}

async function connect(page, from, to, handle = 'out') {
  const source = page.locator(`.react-flow__node:has([data-testid="node-${from}"]) .react-flow__handle[data-handleid="${handle}"]`);
  const target = page.locator(`.react-flow__node:has([data-testid="node-${to}"]) .react-flow__handle[data-handleid="in"]`);
  await source.dragTo(target);
}

async function selectNode(page, name) {
  await page.locator(`[data-testid="node-${name}"] .title`).click();
  await page.waitForFunction((n) => document.querySelector('[data-testid="stage-name"]')?.value === n, name, {
    timeout: 5000,
  });
}

test('build_validate_fix_run', async ({ page, base }) => {
  await page.goto(`${base}/#/editor`);
  await page.waitForSelector('.palette-item[data-kind="lines.read"]', { timeout: 5000 });
  const groups = await page.locator('.palette-group').evaluateAll((gs) => gs.map((g) => g.dataset.category));
  assert(['source', 'transform', 'aggregate', 'process', 'sink'].every((c) => groups.includes(c)), groups.join());
  await dragKind(page, 'lines.read', 80, 120);
  await page.waitForSelector('[data-testid="node-read"]', { timeout: 5000 });
  await dragKind(page, 'words', 340, 120);
  await page.waitForSelector('[data-testid="node-words"]', { timeout: 5000 });
  await dragKind(page, 'ndjson.write', 600, 120);
  await page.waitForSelector('[data-testid="node-write"]', { timeout: 5000 });
  // Required parameters not set yet are shown on the node.
  const missing = await page.locator('[data-testid="node-read"] .missing').innerText();
  assert(missing.includes('path'), missing);
  await connect(page, 'read', 'words');
  await connect(page, 'words', 'write');
  await page.waitForFunction(() => document.querySelectorAll('.react-flow__edge').length === 2, null, { timeout: 5000 });

  await selectNode(page, 'read');
  await page.fill('[data-param="path"] input', 'no/such/file.txt');
  await selectNode(page, 'words');
  await page.check('[data-param="lowercase"] input[type=checkbox]');
  await selectNode(page, 'write');
  await page.fill('[data-param="path"] input', 'target/console-words.ndjson');
  await page.click('[data-testid="validate"]');
  const err = page.locator('[data-testid="node-read"] .node-error[data-param="path"]');
  await err.waitFor({ timeout: 5000 });
  const text = await err.innerText();
  assert(text.includes('cannot open input file'), text);
  assert((await page.locator('[data-testid="node-words"] .node-error').count()) === 0, 'an error on words');
  await page.screenshot({ path: join(shots, 'build_validate_fix_run-error.png') });

  await selectNode(page, 'read');
  await page.fill('[data-param="path"] input', 'examples/data/millrace.txt');
  await page.click('[data-testid="validate"]');
  await page.waitForSelector('[data-testid="banner"].ok', { timeout: 5000 });
  assert((await page.locator('.node-error').count()) === 0, 'errors left after the fix');
  await page.click('[data-testid="run"]');
  await page.waitForSelector('[data-testid="job-page"][data-status="succeeded"]', { timeout: 15000 });
  await page.waitForSelector('[data-testid="final-report"]', { timeout: 5000 });
  const cell = async (step, col) => Number(await page.locator(`tr[data-account="${step}"] td.${col}`).innerText());
  assert((await cell('read', 'out')) === 38, `read out ${await cell('read', 'out')}`);
  assert((await cell('words', 'out')) === 493, `words out ${await cell('words', 'out')}`);
  assert((await cell('write', 'in')) === 493, `write in ${await cell('write', 'in')}`);
  const written = readFileSync(join(root, 'target/console-words.ndjson'), 'utf8').trim().split('\n');
  assert(written.length === 493, `${written.length} lines written`);
  assert(JSON.parse(written[0]).word === written[0].match(/"word":"([^"]*)"/)[1], written[0]);
});

test('parameter_controls_follow_the_spec_and_late_edges_export', async ({ page, base }) => {
  await page.goto(`${base}/#/editor`);
  await page.waitForSelector('.palette-item[data-kind="window"]', { timeout: 5000 });
  await dragKind(page, 'ndjson.read', 60, 80);
  await dragKind(page, 'window', 320, 80);
  await dragKind(page, 'select', 580, 80);
  await dragKind(page, 'ndjson.write', 320, 330);
  await page.waitForSelector('[data-testid="node-write"]', { timeout: 5000 });
  await connect(page, 'read', 'window');
  await connect(page, 'window', 'select');
  // The window's late records go to the sink below it (its lower-left handle).
  await connect(page, 'window', 'write', 'late');
  await page.waitForFunction(() => document.querySelectorAll('.react-flow__edge').length === 3, null, { timeout: 5000 });

  await selectNode(page, 'select');
  // A choice is a select, a list of strings a list editor, an integer with a range a slider.
  const missingOptions = await page.locator('[data-param="missing"] select option').allInnerTexts();
  assert(missingOptions.join() === '(default),omit,null,error', missingOptions.join());
  assert((await page.locator('[data-param="parallelism"] input[type=range]').count()) === 1, 'no slider');
  await page.click('[data-param="fields"] button.add');
  await page.fill('[data-param="fields"] .list-row input', 'n');
  await page.selectOption('[data-param="missing"] select', 'null');
  await selectNode(page, 'window');
  assert((await page.locator('[data-param="ordered"]').count()) === 0, 'a window takes no `ordered`');
  await page.fill('[data-param="time_field"] input', 'ts');
  await page.fill('[data-param="tumbling"] input', '10s');
  await page.fill('[data-param="aggregate"] input', '{ n = "count" }');
  await page.press('[data-param="aggregate"] input', 'Enter');
  await selectNode(page, 'read');
  await page.fill('[data-param="path"] input', 'examples/data/millrace.txt');
  await selectNode(page, 'write');
  await page.fill('[data-param="path"] input', '/dev/null');
  const text = await exportText(page);
  const doc = parse(text);
  assert(doc.stages.window.late === 'write', text);
  assert(doc.stages.write.input === undefined, text);
  assert(doc.stages.select.input === 'window' && doc.stages.select.missing === 'null', text);
  assert(JSON.stringify(doc.stages.select.fields) === '["n"]', text);
  assert(JSON.stringify(doc.stages.window.aggregate) === '{"n":"count"}', text);
  // `select` has no sink after it: the server says so (a wiring error found when the
  // pipeline is built), on its node.
  await page.click('[data-testid="validate"]');
  const err = page.locator('[data-testid="node-select"] .node-error');
  await err.waitFor({ timeout: 5000 });
  const message = await err.innerText();
  assert(message.includes('the output of this `select` stage is not used'), message);
  assert((await page.locator('.node-error').count()) === 1, 'errors on other nodes');
});

async function importText(page, text) {
  await page.click('[data-testid="import-open"]');
  await page.fill('[data-testid="import-text"]', text);
  await page.click('[data-testid="import"]');
}

async function exportText(page) {
  await page.click('[data-testid="export"]');
  return page.locator('[data-testid="export-text"]').inputValue();
}

test('import_wordcount_and_export_it_unchanged', async ({ page, base }) => {
  await page.goto(`${base}/#/editor`);
  await page.waitForSelector('.palette-item', { timeout: 5000 });
  await importText(page, wordcount);
  await page.waitForFunction(() => document.querySelectorAll('.edit-node').length === 5, null, { timeout: 5000 });
  const edges = await page.locator('.react-flow__edge').count();
  assert(edges === 4, `${edges} edges`);
  const first = await exportText(page);
  assert(isDeepStrictEqual(parse(first), parse(wordcount)), `exported:\n${first}\nis not:\n${wordcount}`);
  // import → export → import → export: the same document.
  await importText(page, first);
  await page.waitForFunction(() => document.querySelectorAll('.edit-node').length === 5, null, { timeout: 5000 });
  const second = await exportText(page);
  assert(second === first, `second export differs:\n${second}\n---\n${first}`);
  // And the server takes it as it is.
  await page.click('[data-testid="validate"]');
  await page.waitForSelector('[data-testid="banner"]', { timeout: 5000 });
});

test('twenty_jobs_and_a_thirty_stage_graph_render_within_2s', async ({ page, base }) => {
  for (let i = 0; i < 20; i += 1) await api(base, 'POST', `/jobs?name=wc${i}`, wordcountHere);
  const long = (await api(base, 'POST', '/jobs?name=long', longPipeline(30))).id;
  const all = (await api(base, 'GET', '/jobs')).length;
  assert(all >= 21, `${all} jobs`);
  let t0 = Date.now();
  await page.goto(`${base}/#/`);
  await page.waitForFunction((n) => document.querySelectorAll('tr[data-job]').length >= n, all, { timeout: 2000 });
  const jobsMs = Date.now() - t0;
  t0 = Date.now();
  await page.goto(`${base}/#/jobs/${long}`);
  await page.waitForFunction(
    // Rendered: every node measured and shown (React Flow hides a node until it has its size).
    () =>
      [...document.querySelectorAll('.react-flow__node')].filter(
        (n) => n.querySelector('.stage-node') && getComputedStyle(n).visibility === 'visible',
      ).length === 30 && document.querySelectorAll('.react-flow__edge').length === 29,
    null,
    { timeout: 2000 },
  );
  const graphMs = Date.now() - t0;
  await page.waitForSelector('[data-testid="final-report"]', { timeout: 5000 });
  // In the editor too: the same 30 stages imported and laid out.
  await page.goto(`${base}/#/editor`);
  await page.waitForSelector('.palette-item', { timeout: 5000 });
  t0 = Date.now();
  await importText(page, longPipeline(30));
  await page.waitForFunction(() => document.querySelectorAll('.edit-node').length === 30, null, { timeout: 2000 });
  const editorMs = Date.now() - t0;
  console.log(`    jobs list (${all} jobs): ${jobsMs} ms; 30-stage job graph: ${graphMs} ms; 30-stage import: ${editorMs} ms`);
  // Back to the job (the page's second visit, after its final event): still every node shown.
  await page.goto(`${base}/#/jobs/${long}`);
  await page.waitForFunction(
    () => [...document.querySelectorAll('.react-flow__node')].filter((n) => getComputedStyle(n).visibility === 'visible').length === 30,
    null,
    { timeout: 5000 },
  );
});

const { child, base } = await startServer();
const profile = mkdtempSync(join(tmpdir(), 'millrace-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1440, height: 900 },
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
let failed = 0;
let ran = 0;
let signedIn = false;
const started = Date.now();
for (const t of tests) {
  if (process.env.ONLY && process.env.ONLY !== t.name) continue;
  ran += 1;
  // Every test but the first runs with the token's cookie (the first checks what a browser
  // without it sees).
  if (!signedIn && t.name !== 'no_token_shows_the_prompt_and_no_data') {
    const p = await context.newPage();
    await p.goto(`${base}/?token=${TOKEN}`);
    await p.close();
    signedIn = true;
  }
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  const t0 = Date.now();
  try {
    await t.f({ page, base });
    assert(errors.length === 0, `errors in the page: ${errors.join('; ')}`);
    console.log(`ok   ${t.name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${t.name} (${Date.now() - t0} ms): ${e.stack || e}`);
  }
  await page.screenshot({ path: join(shots, `${t.name}.png`) }).catch(() => {});
  await page.close();
}
await context.close();
child.kill('SIGTERM');
rmSync(profile, { recursive: true, force: true });
console.log(`${ran - failed} passed, ${failed} failed in ${((Date.now() - started) / 1000).toFixed(1)} s; screenshots in ${shots}`);
process.exit(failed ? 1 : 0);
