// The editor's model of a pipeline without a browser (node:test): import → export → import
// keeps a pipeline, its late and dead-letter edges and the tables it does not edit included.
// Run by .ci/browser (`node --test tests/`).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { parse } from 'smol-toml';
import { importToml, exportToml, tomlLiteral, parseLiteral } from '../src/pipeline.js';

// smol-toml's tables have no prototype; compare their content.
const plain = (v) => JSON.parse(JSON.stringify(v));

const withEdges = `
name = "edges"
plugin_dirs = ["plugins"]

[options]
batch_size = 64

[stages.read]
kind = "ndjson.read"
path = "events.ndjson"
on_error = "dead_letter"
dead_letter = "bad"

[stages.bad]
kind = "ndjson.write"
path = "bad.ndjson"

[stages.win]
kind = "window"
input = "read"
time_field = "ts"
tumbling = "10s"
aggregate = { n = "count", total = "sum(amount)" }
late = "latecomers"

[stages.latecomers]
kind = "ndjson.write"
path = "late.ndjson"

[stages.both]
kind = "select"
input = ["win", "read"]
fields = ["n"]

[stages.out]
kind = "ndjson.write"
input = "both"
path = "-"
`;

test('edges of every type come in as edges, not parameters', () => {
  const m = importToml(withEdges);
  const name = Object.fromEntries(m.stages.map((s) => [s.id, s.name]));
  const edges = m.edges.map((e) => `${name[e.from]}->${name[e.to]}:${e.type}`).sort();
  assert.deepEqual(edges, [
    'both->out:data',
    'read->bad:dead_letter',
    'read->both:data',
    'read->win:data',
    'win->both:data',
    'win->latecomers:late',
  ]);
  const read = m.stages.find((s) => s.name === 'read');
  assert.equal(read.params.dead_letter, undefined);
  assert.equal(read.params.on_error, undefined);
  assert.equal(m.stages.find((s) => s.name === 'win').params.late, undefined);
  assert.deepEqual(plain(m.extra), { plugin_dirs: ['plugins'], options: { batch_size: 64 } });
});

test('import, export, import keeps the document', () => {
  for (const text of [withEdges, readFileSync(new URL('../../examples/wordcount.toml', import.meta.url), 'utf8')]) {
    const once = exportToml(importToml(text));
    assert.deepEqual(parse(once), parse(text));
    assert.equal(exportToml(importToml(once)), once);
  }
});

test('an input that names no stage is refused', () => {
  assert.throws(() => importToml('[stages.a]\nkind = "words"\ninput = "nope"\n'), /unknown input `nope`/);
});

test('TOML literals for table and value parameters', () => {
  assert.equal(tomlLiteral({ n: 'count', total: 'sum(amount)' }), '{ n = "count", total = "sum(amount)" }');
  assert.equal(tomlLiteral('the'), '"the"');
  assert.equal(tomlLiteral(3), '3');
  assert.deepEqual(plain(parseLiteral('{ gap = "30s" }')), { gap: '30s' });
  assert.throws(() => parseLiteral('{ gap = '));
});
