import { defineConfig } from 'vitest/config';

// The panel's data logic (src/model.ts) in Node, and its rendering (src/panel.ts) in happy-dom's DOM for the
// files that ask for it (`@vitest-environment happy-dom`); the browser tests (tests/ui) cover the rest.
export default defineConfig({
  test: { include: ['test/**/*.spec.ts'], environment: 'node' }
});
