// What the console's browser tests share (run.mjs: Chromium through playwright-core;
// firefox.mjs: Firefox through geckodriver): where things are, the API with the test's token,
// and the pipelines they submit.
import { writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const bin = process.env.MILLRACE_BIN || join(root, 'target/release/millrace');
export const shots = join(root, 'target/console-screenshots');

export function assert(cond, message) {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}

// A request to the job API with `token`; the body is TOML.
export async function api(token, base, method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/toml';
  const r = await fetch(base + path, { method, headers, body });
  const json = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(json)}`);
  return json;
}

// A pipeline that runs for a while: a slow `exec` stage, one record a batch. Its input is
// `lines` lines in target/<file>.txt.
export function slowPipeline(name, lines, file = `console-${name}`) {
  const input = join(root, 'target', `${file}.txt`);
  writeFileSync(input, 'a line\n'.repeat(lines));
  return `name = "${name}"
[options]
batch_size = 1

[stages.read]
kind = "lines.read"
path = ${JSON.stringify(input)}

[stages.slow]
kind = "exec"
input = "read"
command = ["sh", "-c", "while read -r l; do sleep 0.01; echo '{}'; done"]

[stages.out]
kind = "ndjson.write"
input = "slow"
path = "/dev/null"
`;
}
