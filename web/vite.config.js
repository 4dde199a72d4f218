// The console's build: one script and one style sheet with fixed names (src/http/console.rs
// embeds web/dist/; fixed names mean a rebuild replaces the same files, which the crate's
// include_bytes! tracks, and the server answers them with Cache-Control: no-cache).
import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

export default defineConfig({
  plugins: [react()],
  base: '/',
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    sourcemap: false,
    // One page, one bundle: the graph libraries are most of it.
    chunkSizeWarningLimit: 1500,
    rolldownOptions: {
      output: {
        entryFileNames: 'assets/index.js',
        chunkFileNames: 'assets/[name].js',
        assetFileNames: 'assets/[name][extname]',
      },
    },
  },
});
