import { useEffect, useState, useCallback } from 'react';
import { Unauthorized } from './api.js';
import JobsPage from './JobsPage.jsx';
import JobPage from './JobPage.jsx';
import Editor from './Editor.jsx';

// Views by the URL's hash: `#/` jobs, `#/jobs/{id}` a job, `#/editor` the editor.
function route() {
  const h = window.location.hash.replace(/^#/, '') || '/';
  const job = h.match(/^\/jobs\/(\d+)$/);
  if (job) return { view: 'job', id: Number(job[1]) };
  if (h.startsWith('/editor')) return { view: 'editor' };
  return { view: 'jobs' };
}

export function TokenPrompt() {
  return (
    <main className="token-prompt" id="token-prompt">
      <h1>millrace console</h1>
      <p>
        This server needs its token. Open the URL that <code>millrace serve</code> printed, or paste the token
        here.
      </p>
      <form method="get" action="/">
        <label htmlFor="token">Token</label>
        <input id="token" name="token" autoComplete="off" required minLength={8} />
        <button type="submit">Open the console</button>
      </form>
    </main>
  );
}

export default function App() {
  const [r, setR] = useState(route);
  const [unauthorized, setUnauthorized] = useState(false);
  useEffect(() => {
    const on = () => setR(route());
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  // Any API call that meets a 401 turns the page into the prompt.
  const guard = useCallback((e) => {
    if (e instanceof Unauthorized) setUnauthorized(true);
    return e;
  }, []);
  if (unauthorized) return <TokenPrompt />;
  return (
    <div className="app">
      <header className="top">
        <span className="brand">millrace</span>
        <nav>
          <a href="#/" className={r.view === 'jobs' ? 'active' : ''}>
            Jobs
          </a>
          <a href="#/editor" className={r.view === 'editor' ? 'active' : ''}>
            Editor
          </a>
        </nav>
      </header>
      {r.view === 'jobs' && <JobsPage guard={guard} />}
      {r.view === 'job' && <JobPage key={r.id} id={r.id} guard={guard} />}
      {r.view === 'editor' && <Editor guard={guard} />}
    </div>
  );
}
