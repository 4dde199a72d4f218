import { useEffect, useRef, useState } from 'react';
import { api } from './api.js';
import { fmtRate, fmtSecs } from './metrics.js';

// Records written: what the sinks' accounts took out.
function recordsOut(report) {
  return (report?.accounts || []).filter((a) => a.shape === 'sink').reduce((n, a) => n + a.records_out, 0);
}

export default function JobsPage({ guard }) {
  const [jobs, setJobs] = useState(null);
  const [error, setError] = useState(null);
  const previous = useRef({});
  const [rates, setRates] = useState({});

  useEffect(() => {
    let stop = false;
    let timer;
    const poll = async () => {
      try {
        const list = await api.jobs();
        if (stop) return;
        const now = {};
        const next = {};
        for (const j of list) {
          const read = j.report?.records_read ?? 0;
          now[j.id] = { read, t: j.elapsed_s };
          const p = previous.current[j.id];
          if (j.status === 'running' && p && j.elapsed_s > p.t) next[j.id] = (read - p.read) / (j.elapsed_s - p.t);
          else if (j.status !== 'running' && j.report && j.report.elapsed_s > 0) next[j.id] = read / j.report.elapsed_s;
        }
        previous.current = now;
        setRates(next);
        setJobs(list);
        setError(null);
      } catch (e) {
        guard(e);
        if (!stop) setError(e.message);
      }
      if (!stop) timer = setTimeout(poll, 1000);
    };
    poll();
    return () => {
      stop = true;
      clearTimeout(timer);
    };
  }, [guard]);

  const cancel = async (id) => {
    try {
      await api.cancel(id);
    } catch (e) {
      guard(e);
      setError(e.message);
    }
  };

  if (!jobs) return <main className="page">{error ? <p className="error">{error}</p> : <p>Loading jobs…</p>}</main>;
  const sorted = [...jobs].sort((a, b) => b.id - a.id);
  return (
    <main className="page">
      <h2>Jobs</h2>
      {error && <p className="error">{error}</p>}
      {sorted.length === 0 ? (
        <p className="empty">
          No jobs yet. Build one in the <a href="#/editor">editor</a>, or POST a pipeline to <code>/jobs</code>.
        </p>
      ) : (
        <table className="jobs" data-testid="jobs-table">
          <thead>
            <tr>
              <th>id</th>
              <th>name</th>
              <th>state</th>
              <th className="num">records in</th>
              <th className="num">records out</th>
              <th className="num">rate</th>
              <th className="num">elapsed</th>
              <th></th>
            </tr>
          </thead>
          <tbody>
            {sorted.map((j) => (
              <tr key={j.id} data-job={j.id} data-status={j.status}>
                <td>
                  <a href={`#/jobs/${j.id}`}>{j.id}</a>
                </td>
                <td>
                  <a href={`#/jobs/${j.id}`}>{j.name}</a>
                </td>
                <td>
                  <span className={`status ${j.status}`}>{j.status}</span>
                </td>
                <td className="num records-in">{(j.report?.records_read ?? 0).toLocaleString('en')}</td>
                <td className="num records-out">{recordsOut(j.report).toLocaleString('en')}</td>
                <td className="num rate">{rates[j.id] !== undefined ? fmtRate(rates[j.id]) : '–'}</td>
                <td className="num">{fmtSecs(j.elapsed_s)}</td>
                <td>
                  {j.status === 'running' && (
                    <button className="danger cancel" onClick={() => cancel(j.id)}>
                      Cancel
                    </button>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </main>
  );
}
