import { useCallback, useEffect, useMemo, useRef, useState } from 'react';
import { ReactFlow, Background, Controls, Handle, Position, MarkerType, applyNodeChanges } from '@xyflow/react';
import { api, follow } from './api.js';
import { layout } from './layout.js';
import { stageFigures, bottleneck, backpressureColour, fmtRate, fmtPct, fmtSecs } from './metrics.js';

function Shares({ f }) {
  return (
    <div className="shares" title={`busy ${fmtPct(f.busy)}, backpressure ${fmtPct(f.backpressure)}, idle ${fmtPct(f.idle)}`}>
      <span className="busy" style={{ width: fmtPct(f.busy) }} />
      <span className="back" style={{ width: fmtPct(f.backpressure) }} />
      <span className="idle" style={{ width: fmtPct(f.idle) }} />
    </div>
  );
}

function StageNode({ data }) {
  const { stage, f, isBottleneck } = data;
  return (
    <div
      className={`stage-node${isBottleneck ? ' bottleneck' : ''}`}
      style={{ background: f ? backpressureColour(f.backpressure) : undefined }}
      data-testid={`stage-${stage.name}`}
      data-stage={stage.name}
    >
      {!stage.source && <Handle type="target" position={Position.Left} isConnectable={false} />}
      <div className="title">
        <strong>{stage.name}</strong>
        {stage.parallelism > 1 && <span className="par">×{stage.parallelism}</span>}
        {isBottleneck && <span className="badge">bottleneck</span>}
      </div>
      <div className="kind">{stage.kind}</div>
      {f && (
        <>
          <div className="rates">
            <span className="rate-in" title="records in per second">
              in {fmtRate(f.rateIn)}
            </span>
            <span className="rate-out" title="records out per second">
              out {fmtRate(f.rateOut)}
            </span>
          </div>
          <div className="counts">
            {f.recordsIn.toLocaleString('en')} → {f.recordsOut.toLocaleString('en')}
          </div>
          <Shares f={f} />
          <div className="share-text">
            busy {fmtPct(f.busy)} · backpressure <span className="bp">{fmtPct(f.backpressure)}</span> · idle{' '}
            {fmtPct(f.idle)}
          </div>
          {f.skipped + f.deadLettered + f.late + f.filtered > 0 && (
            <div className="lost" data-testid={`lost-${stage.name}`}>
              {f.filtered > 0 && <span>filtered {f.filtered.toLocaleString('en')} </span>}
              {f.skipped > 0 && <span>skipped {f.skipped.toLocaleString('en')} </span>}
              {f.deadLettered > 0 && <span className="dead">dead letters {f.deadLettered.toLocaleString('en')} </span>}
              {f.late > 0 && <span className="late">late {f.late.toLocaleString('en')}</span>}
            </div>
          )}
          {f.fusedWith !== stage.name && (
            <div className="fused" title="stages fused into one thread share its time and queue">
              thread {f.fusedWith}
              {f.instances > 1 ? ` ×${f.instances}` : ''}
            </div>
          )}
          {f.queueFill !== null && (
            <div className="queue" title="input queue fill">
              queue <meter min={0} max={1} value={f.queueFill} /> {fmtPct(f.queueFill)}
            </div>
          )}
        </>
      )}
      {!stage.sink && <Handle type="source" position={Position.Right} isConnectable={false} />}
    </div>
  );
}

const nodeTypes = { stage: StageNode };

function edgeStyle(type) {
  if (type === 'late') return { style: { stroke: '#d98a00', strokeDasharray: '6 4' }, label: 'late' };
  if (type === 'dead_letter') return { style: { stroke: '#c62828', strokeDasharray: '2 4' }, label: 'dead letters' };
  return { style: { stroke: '#556' } };
}

function ReportTables({ report, ended }) {
  if (!report) return null;
  return (
    <section className="report" data-testid="final-report">
      <h3>{ended === 'succeeded' ? 'Report' : `Report (as the job ended: ${ended})`}</h3>
      <p>
        {report.records_read.toLocaleString('en')} records read in {fmtSecs(report.elapsed_s)}
      </p>
      <h4>Per stage (accounting)</h4>
      <table className="accounts">
        <thead>
          <tr>
            <th>step</th>
            <th>shape</th>
            <th className="num">in</th>
            <th className="num">out</th>
            <th className="num">filtered</th>
            <th className="num">skipped</th>
            <th className="num">dead letters</th>
            <th className="num">late</th>
          </tr>
        </thead>
        <tbody>
          {(report.accounts || []).map((a, i) => (
            <tr key={i} data-account={a.stage}>
              <td>{a.stage}</td>
              <td>{a.shape}</td>
              <td className="num in">{a.records_in}</td>
              <td className="num out">{a.records_out}</td>
              <td className="num">{a.filtered}</td>
              <td className="num">{a.skipped}</td>
              <td className="num">{a.dead_lettered}</td>
              <td className="num">{a.late}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <h4>Per thread</h4>
      <table className="instances">
        <thead>
          <tr>
            <th>stage</th>
            <th className="num">instance</th>
            <th className="num">in</th>
            <th className="num">out</th>
            <th className="num">busy ms</th>
            <th className="num">blocked sending ms</th>
            <th className="num">idle ms</th>
          </tr>
        </thead>
        <tbody>
          {(report.stages || []).map((s, i) => (
            <tr key={i}>
              <td>{s.stage}</td>
              <td className="num">{s.instance}</td>
              <td className="num">{s.records_in}</td>
              <td className="num">{s.records_out}</td>
              <td className="num">{s.busy_ms.toFixed(1)}</td>
              <td className="num">{s.send_blocked_ms.toFixed(1)}</td>
              <td className="num">{s.recv_blocked_ms.toFixed(1)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

export default function JobPage({ id, guard }) {
  const [job, setJob] = useState(null);
  const [error, setError] = useState(null);
  const [reports, setReports] = useState({ now: null, before: null });
  const [final, setFinal] = useState(null);
  const renders = useRef(0);

  useEffect(() => {
    let stop = false;
    api
      .job(id)
      .then((j) => {
        if (stop) return;
        setJob(j);
        if (j.report) setReports({ now: j.report, before: null });
      })
      .catch((e) => {
        guard(e);
        setError(e.message);
      });
    const unfollow = follow(id, (kind, e) => {
      if (stop) return;
      if (kind === 'progress' || kind === 'finished') {
        setReports((r) => ({ now: e.report, before: r.now }));
      }
      if (kind === 'finished' || kind === 'failed' || kind === 'cancelled') {
        setFinal({ kind, ...e });
        api.job(id).then((j) => !stop && setJob(j)).catch(guard);
      }
    });
    return () => {
      stop = true;
      unfollow();
    };
  }, [id, guard]);

  // The graph does not change while a job lives: keep the first one seen (a later fetch of
  // the job would otherwise lay it out again).
  const graphKey = job?.graph ? JSON.stringify(job.graph) : null;
  const graph = useMemo(() => (graphKey ? JSON.parse(graphKey) : null), [graphKey]);
  const positioned = useMemo(() => {
    if (!graph) return [];
    const nodes = graph.stages.map((s) => ({ id: s.name, type: 'stage', data: { stage: s } }));
    const edges = graph.edges.map((e) => ({ source: e.from, target: e.to }));
    return layout(nodes, edges);
  }, [graph]);

  // Live: rates and shares over the interval between the last two reports; once the job has
  // ended, over the whole run.
  const running = !final && job?.status === 'running';
  const figures = useMemo(() => {
    if (!graph || !reports.now) return {};
    const before = running ? reports.before : null;
    return Object.fromEntries(graph.stages.map((s) => [s.name, stageFigures(s.name, reports.now, before)]));
  }, [graph, reports, running]);
  const neck = job?.status === 'running' && graph ? bottleneck(figures, graph) : null;

  // React Flow's state of the nodes (their measured sizes among it), kept as it asks of a
  // controlled flow; the live figures are merged in at each render.
  const [rfNodes, setRfNodes] = useState([]);
  // A node React Flow has measured keeps its measurement: a node handed back without one is
  // hidden until its size changes, which for the same node never happens.
  useEffect(
    () =>
      setRfNodes((old) => {
        const measured = Object.fromEntries(old.map((n) => [n.id, n.measured]));
        return positioned.map((n) => (measured[n.id] ? { ...n, measured: measured[n.id] } : n));
      }),
    [positioned],
  );
  const onNodesChange = useCallback((changes) => setRfNodes((ns) => applyNodeChanges(changes, ns)), []);
  const nodes = rfNodes.map((n) => ({
    ...n,
    data: { ...n.data, f: figures[n.id], isBottleneck: n.id === neck },
    draggable: false,
    connectable: false,
  }));
  const edges = (graph?.edges || []).map((e, i) => ({
    id: `e${i}`,
    source: e.from,
    target: e.to,
    type: 'smoothstep',
    markerEnd: { type: MarkerType.ArrowClosed },
    className: `edge-${e.type}`,
    ...edgeStyle(e.type),
  }));
  renders.current += 1;

  const cancel = async () => {
    try {
      await api.cancel(id);
    } catch (e) {
      guard(e);
      setError(e.message);
    }
  };

  if (error && !job) return <main className="page"><p className="error">{error}</p></main>;
  if (!job) return <main className="page"><p>Loading job {id}…</p></main>;
  const status = final ? { finished: 'succeeded', failed: 'failed', cancelled: 'cancelled' }[final.kind] : job.status;
  const finalReport = final?.kind === 'finished' ? final.report : job.status !== 'running' ? job.report : null;
  return (
    <main className="page job-page" data-testid="job-page" data-status={status}>
      <div className="job-head">
        <h2>
          Job {job.id}: {job.name}
        </h2>
        <span className={`status ${status}`} data-testid="job-status">
          {status}
        </span>
        <span className="elapsed">{fmtSecs(reports.now?.elapsed_s ?? job.elapsed_s)}</span>
        {status === 'running' && (
          <button className="danger" onClick={cancel} data-testid="cancel">
            Cancel
          </button>
        )}
      </div>
      {(final?.kind === 'failed' || job.error) && (
        <div className="error job-error" data-testid="job-error">
          <strong>Failed{final?.stage ? ` in stage ${final.stage}` : ''}:</strong> {final?.error || job.error}
        </div>
      )}
      {graph ? (
        <div className="graph" data-testid="job-graph">
          <ReactFlow
            nodes={nodes}
            edges={edges}
            nodeTypes={nodeTypes}
            onNodesChange={onNodesChange}
            fitView
            fitViewOptions={{ maxZoom: 1.1 }}
            minZoom={0.1}
            nodesDraggable={false}
            nodesConnectable={false}
          >
            <Background />
            <Controls showInteractive={false} />
          </ReactFlow>
        </div>
      ) : (
        <p className="empty">This job was built in code: it has no stage graph to show.</p>
      )}
      <p className="legend">
        Colour: share of time blocked sending (backpressure), green none → red all. Bar: <span className="key busy" />{' '}
        busy <span className="key back" /> backpressure <span className="key idle" /> idle, over the last interval.
        Dashed edges: <span className="late-key">late records</span>, <span className="dead-key">dead letters</span>.
      </p>
      <ReportTables report={finalReport} ended={status} />
    </main>
  );
}
