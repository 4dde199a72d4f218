// The editor's model of a pipeline and its TOML: import (a file's text into stages and edges)
// and export (the model back into TOML). Edges are of three types: `data` (a stage's `input`),
// `late` (a window's `late = "<stage>"`) and `dead_letter` (a stage's `dead_letter`, with
// `on_error = "dead_letter"`). What the model does not edit (`[options]`, `[checkpoint]`,
// `plugin_dirs`) passes through unchanged. Comments and key order are not kept.
import { parse, stringify } from 'smol-toml';

let counter = 0;
export function newId() {
  counter += 1;
  return `n${Date.now().toString(36)}${counter}`;
}

export function emptyModel() {
  return { name: 'pipeline', extra: {}, stages: [], edges: [] };
}

// `text` → {name, extra, stages: [{id, name, kind, params}], edges: [{id, from, to, type}]}
// (ids are stage ids). Throws on TOML that does not parse, or stages that are not tables.
export function importToml(text) {
  const doc = parse(text);
  const { name, stages = {}, ...extra } = doc;
  if (typeof stages !== 'object' || Array.isArray(stages)) throw new Error('`stages` is not a table');
  const model = { name: name ?? 'pipeline', extra, stages: [], edges: [] };
  const idOf = {};
  for (const stageName of Object.keys(stages)) idOf[stageName] = newId();
  const edge = (from, to, type) => {
    if (idOf[from] === undefined || idOf[to] === undefined) return;
    model.edges.push({ id: `e${model.edges.length}-${type}`, from: idOf[from], to: idOf[to], type });
  };
  for (const [stageName, table] of Object.entries(stages)) {
    if (typeof table !== 'object' || Array.isArray(table)) throw new Error(`stage \`${stageName}\` is not a table`);
    const { kind, input, ...params } = table;
    const inputs = input === undefined ? [] : Array.isArray(input) ? input : [input];
    for (const i of inputs) {
      if (idOf[i] === undefined) throw new Error(`stage \`${stageName}\`: unknown input \`${i}\``);
      edge(i, stageName, 'data');
    }
    if (kind === 'window' && typeof params.late === 'string' && idOf[params.late] !== undefined) {
      edge(stageName, params.late, 'late');
      delete params.late;
    }
    if (typeof params.dead_letter === 'string' && idOf[params.dead_letter] !== undefined) {
      edge(stageName, params.dead_letter, 'dead_letter');
      delete params.dead_letter;
      if (params.on_error === 'dead_letter') delete params.on_error;
    }
    model.stages.push({ id: idOf[stageName], name: stageName, kind: kind ?? '', params });
  }
  return model;
}

function isSet(v) {
  return v !== undefined && v !== null && v !== '';
}

// The model → a TOML document (as an object, then text).
export function toDocument(model) {
  const doc = {};
  if (model.name) doc.name = model.name;
  Object.assign(doc, model.extra);
  const byId = Object.fromEntries(model.stages.map((s) => [s.id, s]));
  const stages = {};
  for (const s of model.stages) {
    const t = { kind: s.kind };
    const inputs = model.edges.filter((e) => e.to === s.id && e.type === 'data').map((e) => byId[e.from]?.name).filter(Boolean);
    if (inputs.length === 1) t.input = inputs[0];
    else if (inputs.length > 1) t.input = inputs;
    for (const [k, v] of Object.entries(s.params)) if (isSet(v)) t[k] = v;
    for (const e of model.edges.filter((e) => e.from === s.id)) {
      const target = byId[e.to]?.name;
      if (!target) continue;
      if (e.type === 'late') t.late = target;
      if (e.type === 'dead_letter') {
        t.on_error = 'dead_letter';
        t.dead_letter = target;
      }
    }
    stages[s.name] = t;
  }
  doc.stages = stages;
  return doc;
}

export function exportToml(model) {
  return stringify(toDocument(model)) + '\n';
}

// A TOML value as the editor shows it in a text field (`"text"`, `3`, `{ n = "count" }`).
export function tomlLiteral(v) {
  if (v === undefined) return '';
  const text = stringify({ v });
  const line = text.trim();
  if (line.startsWith('v = ')) return line.slice(4);
  // A table: smol-toml writes `[v]` and its keys; show it inline.
  return inlineTable(v);
}

function inlineTable(v) {
  if (v && typeof v === 'object' && !Array.isArray(v)) {
    return `{ ${Object.entries(v).map(([k, x]) => `${/^[A-Za-z0-9_-]+$/.test(k) ? k : JSON.stringify(k)} = ${inlineTable(x)}`).join(', ')} }`;
  }
  if (Array.isArray(v)) return `[${v.map(inlineTable).join(', ')}]`;
  return stringify({ v }).trim().slice(4);
}

// A text field's TOML literal → its value; throws when it is not one.
export function parseLiteral(text) {
  return parse(`v = ${text}`).v;
}
