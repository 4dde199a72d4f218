// The server's API as the page uses it. Every request carries the token's cookie (set by the
// first `/?token=` load); a 401 means the cookie is gone or stale, and the page asks again.

export class Unauthorized extends Error {
  constructor() {
    super('the server needs its token');
  }
}

async function call(method, path, toml) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (toml !== undefined) {
    init.headers['Content-Type'] = 'application/toml';
    init.body = toml;
  }
  const r = await fetch(path, init);
  if (r.status === 401) throw new Unauthorized();
  const text = await r.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    throw new Error(`${method} ${path}: ${r.status} ${text.slice(0, 200)}`);
  }
  if (!r.ok) throw new Error(body.error || `${method} ${path}: ${r.status}`);
  return body;
}

export const api = {
  jobs: () => call('GET', '/jobs'),
  job: (id) => call('GET', `/jobs/${id}`),
  cancel: (id) => call('DELETE', `/jobs/${id}`),
  submit: (toml, name) => call('POST', `/jobs?name=${encodeURIComponent(name || 'console')}`, toml),
  validate: (toml) => call('POST', '/validate', toml),
  kinds: () => call('GET', '/kinds'),
  nodes: () => call('GET', '/plugins/nodes'),
};

const KINDS = ['started', 'progress', 'warning', 'finished', 'failed', 'cancelled', 'lagged'];
const FINAL = new Set(['finished', 'failed', 'cancelled']);

// Follows a job's event stream; closes it after the final event (an EventSource would otherwise
// reconnect and receive the final event again). Returns the function that stops following.
export function follow(id, onEvent, onError) {
  const es = new EventSource(`/jobs/${id}/events`);
  for (const kind of KINDS) {
    es.addEventListener(kind, (e) => {
      const data = JSON.parse(e.data);
      onEvent(kind, data);
      if (FINAL.has(kind)) es.close();
    });
  }
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED && onError) onError();
  };
  return () => es.close();
}
