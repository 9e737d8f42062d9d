import { defineConfig } from 'vitest/config';

// The panel's data logic only (src/model.ts): no DOM, no JupyterLab; the browser tests (tests/ui) cover the rest.
export default defineConfig({
  test: { include: ['test/**/*.spec.ts'], environment: 'node' }
});
