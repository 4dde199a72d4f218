import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import '@xyflow/react/dist/style.css';
import './styles.css';
import App from './App.jsx';

// The token arrived once in the URL (`/?token=…`) and is now the page's cookie: keep it out of
// the address bar and the history.
if (new URLSearchParams(window.location.search).has('token')) {
  window.history.replaceState(null, '', `/${window.location.hash}`);
}

createRoot(document.getElementById('root')).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
