import { useCallback, useEffect, useMemo, useRef, useState } from 'react';
import {
  ReactFlow,
  ReactFlowProvider,
  Background,
  Controls,
  Handle,
  Position,
  MarkerType,
  useReactFlow,
  applyNodeChanges,
} from '@xyflow/react';
import { api } from './api.js';
import { layout } from './layout.js';
import { emptyModel, importToml, exportToml, newId } from './pipeline.js';
import ParamControl from './ParamControl.jsx';

// The palette: built-in kinds (`GET /kinds`) and plugin nodes (`GET /plugins/nodes`) in one
// shape. A plugin node takes the stage keys every plugin stage has besides its own parameters.
function paletteEntries(kinds, nodes) {
  const plugin = (n) => ({
    kind: n.kind,
    category: `plugin: ${n.plugin}`,
    description: n.description,
    source: false,
    sink: false,
    record_errors: n.plugin_kind !== 'native',
    late_output: false,
    minimal: [],
    params: {
      ...Object.fromEntries(Object.entries(n.params || {}).map(([k, p]) => [k, { ...p, excludes: [] }])),
      parallelism: { type: 'integer', description: 'instances to run', required: false, min: 1, max: 1024 },
      grant: {
        type: 'string_list',
        description: `permissions granted (it requests: ${(n.permissions || []).join(', ') || 'nothing'})`,
        required: (n.permissions || []).length > 0,
      },
      timeout: { type: 'duration', description: 'the longest a batch may take', required: false },
    },
  });
  return [...kinds, ...nodes.map(plugin)];
}

// What a stage lacks before the server is asked: required parameters, one of a choice, an input.
function missingOf(stage, spec, model) {
  if (!spec) return [];
  const missing = [];
  const set = (k) => stage.params[k] !== undefined && stage.params[k] !== '';
  for (const [k, p] of Object.entries(spec.params)) if (p.required && !set(k)) missing.push(k);
  for (const k of spec.minimal || []) {
    const p = spec.params[k];
    const alternatives = [k, ...(p?.excludes || [])];
    if (k === 'value' && stage.params.op === 'exists') continue;
    if (!alternatives.some(set)) missing.push(alternatives.length > 1 ? alternatives.join(' | ') : k);
  }
  const fed = model.edges.some((e) => e.to === stage.id);
  if (!spec.source && !fed) missing.push('input');
  return missing;
}

function EditNode({ data, selected }) {
  const { stage, spec, missing, errors } = data;
  return (
    <div
      className={`edit-node${selected ? ' selected' : ''}${errors.length ? ' has-errors' : ''}`}
      data-testid={`node-${stage.name}`}
      data-kind={stage.kind}
    >
      {!spec?.source && <Handle type="target" position={Position.Left} id="in" />}
      <div className="title">
        <strong>{stage.name}</strong>
      </div>
      <div className="kind">{stage.kind}</div>
      {missing.length > 0 && <div className="missing">missing: {missing.join(', ')}</div>}
      {errors.map((e, i) => (
        <div className="node-error" key={i} data-param={e.param || ''}>
          {e.param ? <code>{e.param}</code> : null} {e.message}
        </div>
      ))}
      {!spec?.sink && <Handle type="source" position={Position.Right} id="out" />}
      {spec?.late_output && (
        <Handle type="source" position={Position.Bottom} id="late" className="late-handle" style={{ left: '30%' }} title="late records" />
      )}
      {spec?.record_errors && (
        <Handle type="source" position={Position.Bottom} id="dead" className="dead-handle" style={{ left: '70%' }} title="dead letters" />
      )}
    </div>
  );
}

const nodeTypes = { edit: EditNode };
const TYPE_OF_HANDLE = { out: 'data', late: 'late', dead: 'dead_letter' };

function uniqueName(base, stages) {
  const clean = base.replace(/[^A-Za-z0-9_]+/g, '_');
  let name = clean;
  for (let i = 2; stages.some((s) => s.name === name); i += 1) name = `${clean}${i}`;
  return name;
}

function Canvas({ guard }) {
  const [palette, setPalette] = useState([]);
  const [model, setModel] = useState(emptyModel);
  // React Flow's own state of the nodes (position, measured size, selection), kept with
  // applyNodeChanges as React Flow asks of a controlled flow; the stages themselves are `model`.
  const [rfNodes, setRfNodes] = useState([]);
  const selected = rfNodes.find((n) => n.selected)?.id ?? null;
  const [errors, setErrors] = useState(null); // null: not validated since the last change
  const [banner, setBanner] = useState(null);
  const [exported, setExported] = useState(null);
  const [importing, setImporting] = useState(false);
  const [importText, setImportText] = useState('');
  const [busy, setBusy] = useState(false);
  const wrapper = useRef(null);
  const flow = useReactFlow();

  useEffect(() => {
    Promise.all([api.kinds(), api.nodes()])
      .then(([kinds, nodes]) => setPalette(paletteEntries(kinds, nodes)))
      .catch((e) => {
        guard(e);
        setBanner({ kind: 'error', text: e.message });
      });
  }, [guard]);

  const specOf = useMemo(() => Object.fromEntries(palette.map((p) => [p.kind, p])), [palette]);
  const groups = useMemo(() => {
    const g = {};
    for (const p of palette) (g[p.category] ||= []).push(p);
    return Object.entries(g);
  }, [palette]);

  const change = (f) => {
    setModel((m) => f(m));
    setErrors(null);
    setExported(null);
  };

  const addStage = (kind, position) => {
    const id = newId();
    change((m) => ({ ...m, stages: [...m.stages, { id, name: uniqueName(kind.split('.').pop(), m.stages), kind, params: {} }] }));
    setRfNodes((ns) => [...ns.map((n) => (n.selected ? { ...n, selected: false } : n)), { id, type: 'edit', position, selected: true, data: {} }]);
  };

  const onDrop = (event) => {
    event.preventDefault();
    const kind = event.dataTransfer.getData('application/x-millrace-kind');
    if (!kind) return;
    addStage(kind, flow.screenToFlowPosition({ x: event.clientX, y: event.clientY }));
  };

  const onConnect = useCallback((c) => {
    if (c.source === c.target) return;
    const type = TYPE_OF_HANDLE[c.sourceHandle || 'out'] || 'data';
    change((m) => {
      if (m.edges.some((e) => e.from === c.source && e.to === c.target && e.type === type)) return m;
      // A stage sends its late records, and its dead letters, to one stage.
      const edges = type === 'data' ? m.edges : m.edges.filter((e) => !(e.from === c.source && e.type === type));
      return { ...m, edges: [...edges, { id: newId(), from: c.source, to: c.target, type }] };
    });
  }, []);

  const onNodesChange = useCallback((changes) => {
    setRfNodes((ns) => applyNodeChanges(changes, ns));
    const gone = new Set(changes.filter((c) => c.type === 'remove').map((c) => c.id));
    if (gone.size) {
      change((m) => ({
        ...m,
        stages: m.stages.filter((s) => !gone.has(s.id)),
        edges: m.edges.filter((e) => !gone.has(e.from) && !gone.has(e.to)),
      }));
    }
  }, []);
  const onEdgesChange = useCallback((changes) => {
    const gone = new Set(changes.filter((c) => c.type === 'remove').map((c) => c.id));
    if (gone.size) change((m) => ({ ...m, edges: m.edges.filter((e) => !gone.has(e.id)) }));
  }, []);

  const errorsOf = (name) => (errors || []).filter((e) => e.stage === name);
  const stageById = Object.fromEntries(model.stages.map((st) => [st.id, st]));
  const nodes = rfNodes
    .filter((n) => stageById[n.id])
    .map((n) => {
      const st = stageById[n.id];
      return {
        ...n,
        data: { stage: st, spec: specOf[st.kind], missing: missingOf(st, specOf[st.kind], model), errors: errorsOf(st.name) },
      };
    });
  const edges = model.edges.map((e) => ({
    id: e.id,
    source: e.from,
    target: e.to,
    sourceHandle: { data: 'out', late: 'late', dead_letter: 'dead' }[e.type],
    targetHandle: 'in',
    markerEnd: { type: MarkerType.ArrowClosed },
    label: e.type === 'data' ? undefined : e.type === 'late' ? 'late' : 'dead letters',
    style: e.type === 'late' ? { stroke: '#d98a00', strokeDasharray: '6 4' } : e.type === 'dead_letter' ? { stroke: '#c62828', strokeDasharray: '2 4' } : undefined,
  }));

  const toml = () => exportToml(model);

  const validate = async () => {
    setBusy(true);
    try {
      const r = await api.validate(toml());
      setErrors(r.errors);
      const loose = r.errors.filter((e) => !e.stage || !model.stages.some((s) => s.name === e.stage));
      setBanner(
        r.ok
          ? { kind: 'ok', text: 'Valid: the server accepts this pipeline.' }
          : { kind: 'error', text: `${r.errors.length} error${r.errors.length === 1 ? '' : 's'}${loose.length ? `: ${loose.map((e) => e.message).join('; ')}` : ' (on their stages)'}` },
      );
      return r.ok;
    } catch (e) {
      guard(e);
      setBanner({ kind: 'error', text: e.message });
      return false;
    } finally {
      setBusy(false);
    }
  };

  const run = async () => {
    if (!(await validate())) return;
    try {
      const { id } = await api.submit(toml(), model.name.replace(/[^A-Za-z0-9._-]/g, '_') || 'console');
      window.location.hash = `#/jobs/${id}`;
    } catch (e) {
      guard(e);
      setBanner({ kind: 'error', text: e.message });
    }
  };

  const doImport = () => {
    try {
      const m = importToml(importText);
      const laid = layout(
        m.stages.map((s) => ({ id: s.id })),
        m.edges.map((e) => ({ source: e.from, target: e.to })),
        { width: 200, height: 90 },
      );
      setRfNodes(laid.map((n) => ({ id: n.id, type: 'edit', position: n.position, data: {} })));
      setModel(m);
      setErrors(null);
      setExported(null);
      setImporting(false);
      setBanner({ kind: 'ok', text: `Imported ${m.stages.length} stages.` });
      window.requestAnimationFrame(() => flow.fitView({ maxZoom: 1 }));
    } catch (e) {
      setBanner({ kind: 'error', text: `Cannot import: ${e.message}` });
    }
  };

  const sel = model.stages.find((s) => s.id === selected);
  const selSpec = sel && specOf[sel.kind];
  const setParam = (k, v) =>
    change((m) => ({
      ...m,
      stages: m.stages.map((s) => {
        if (s.id !== selected) return s;
        const params = { ...s.params };
        if (v === undefined) delete params[k];
        else params[k] = v;
        return { ...s, params };
      }),
    }));
  const rename = (name) => change((m) => ({ ...m, stages: m.stages.map((s) => (s.id === selected ? { ...s, name } : s)) }));

  return (
    <div className="editor">
      <aside className="palette" data-testid="palette">
        <h3>Palette</h3>
        {groups.map(([category, entries]) => (
          <section key={category} className="palette-group" data-category={category}>
            <h4>{category}</h4>
            {entries.map((p) => (
              <div
                key={p.kind}
                className="palette-item"
                data-kind={p.kind}
                draggable
                onDragStart={(e) => {
                  e.dataTransfer.setData('application/x-millrace-kind', p.kind);
                  e.dataTransfer.effectAllowed = 'move';
                }}
                onDoubleClick={() => addStage(p.kind, flow.screenToFlowPosition({ x: 400, y: 200 }))}
                title="drag onto the canvas (or double-click)"
              >
                <div className="palette-kind">{p.kind}</div>
                <div className="palette-desc">{p.description}</div>
              </div>
            ))}
          </section>
        ))}
      </aside>
      <section className="canvas-col">
        <div className="toolbar">
          <label>
            name{' '}
            <input
              value={model.name}
              data-testid="pipeline-name"
              onChange={(e) => change((m) => ({ ...m, name: e.target.value }))}
            />
          </label>
          <button onClick={validate} disabled={busy} data-testid="validate">
            Validate
          </button>
          <button onClick={run} disabled={busy || model.stages.length === 0} className="primary" data-testid="run">
            Run
          </button>
          <button onClick={() => setExported(toml())} data-testid="export">
            Export TOML
          </button>
          <button onClick={() => setImporting((x) => !x)} data-testid="import-open">
            Import TOML
          </button>
          {banner && (
            <span className={`banner ${banner.kind}`} data-testid="banner">
              {banner.text}
            </span>
          )}
        </div>
        {importing && (
          <div className="import-panel">
            <textarea
              data-testid="import-text"
              value={importText}
              onChange={(e) => setImportText(e.target.value)}
              placeholder="paste a pipeline file, or choose one"
              rows={10}
            />
            <div>
              <input
                type="file"
                accept=".toml,text/plain"
                onChange={async (e) => e.target.files[0] && setImportText(await e.target.files[0].text())}
              />
              <button onClick={doImport} className="primary" data-testid="import">
                Import
              </button>
            </div>
          </div>
        )}
        {exported !== null && (
          <div className="export-panel">
            <textarea readOnly value={exported} data-testid="export-text" rows={12} />
            <div>
              <a
                href={`data:application/toml;charset=utf-8,${encodeURIComponent(exported)}`}
                download={`${model.name || 'pipeline'}.toml`}
              >
                Download
              </a>{' '}
              <button onClick={() => setExported(null)}>Close</button>
            </div>
          </div>
        )}
        <div className="canvas" ref={wrapper} onDrop={onDrop} onDragOver={(e) => e.preventDefault()} data-testid="canvas">
          <ReactFlow
            nodes={nodes}
            edges={edges}
            nodeTypes={nodeTypes}
            onNodesChange={onNodesChange}
            onEdgesChange={onEdgesChange}
            onConnect={onConnect}
            deleteKeyCode={['Delete']}
            defaultViewport={{ x: 0, y: 0, zoom: 1 }}
            minZoom={0.1}
            maxZoom={2}
          >
            <Background />
            <Controls />
          </ReactFlow>
        </div>
      </section>
      <aside className="inspector" data-testid="inspector">
        {sel ? (
          <>
            <h3>Stage</h3>
            <label className="field">
              <span>name</span>
              <input value={sel.name} data-testid="stage-name" onChange={(e) => rename(e.target.value)} />
            </label>
            <p className="kind">
              <code>{sel.kind}</code> {selSpec?.description}
            </p>
            {!selSpec && <p className="error">unknown kind: not in the palette</p>}
            {selSpec &&
              Object.entries(selSpec.params).map(([k, p]) => (
                <ParamControl
                  key={`${sel.id}-${k}`}
                  name={k}
                  spec={p}
                  value={sel.params[k]}
                  onChange={(v) => setParam(k, v)}
                  errors={errorsOf(sel.name).filter((e) => e.param === k)}
                  missing={missingOf(sel, selSpec, model).includes(k)}
                />
              ))}
            <button
              className="danger"
              onClick={() => onNodesChange([{ type: 'remove', id: sel.id }])}
              data-testid="delete-stage"
            >
              Delete stage
            </button>
          </>
        ) : (
          <p className="empty">
            Drag a kind from the palette onto the canvas; connect a stage&apos;s right handle to the next one&apos;s left
            handle (a window&apos;s lower-left handle sends its late records, a lower-right one its dead letters). Select a
            stage to set its parameters.
          </p>
        )}
      </aside>
    </div>
  );
}

export default function Editor({ guard }) {
  return (
    <ReactFlowProvider>
      <Canvas guard={guard} />
    </ReactFlowProvider>
  );
}
