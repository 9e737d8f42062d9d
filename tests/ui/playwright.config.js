// Browser tests of the FIRST sidebar and of `%first` cells' outputs in Debian's Chromium (no downloaded browser:
// PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD), against a Jupyter server Playwright starts with jupyter_server_test_config.py.
// Video and trace stay off: both need an ffmpeg Playwright would download.
const path = require('path');
const baseConfig = require('@jupyterlab/galata/lib/playwright-config');

const port = process.env.FIRST_UI_PORT || '8888';

module.exports = {
  ...baseConfig,
  reporter: [['list']],
  testDir: 'tests',
  timeout: 300000,
  expect: { timeout: 30000 },
  workers: 1,
  retries: 0,
  use: {
    ...baseConfig.use,
    baseURL: `http://localhost:${port}`,
    video: 'off',
    trace: 'off',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
      args: ['--no-sandbox', '--headless', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync']
    }
  },
  webServer: {
    command: `jupyter lab --config ${path.join(__dirname, 'jupyter_server_test_config.py')}` +
      (process.getuid && process.getuid() === 0 ? ' --allow-root' : ''),
    url: `http://localhost:${port}/lab`,
    timeout: 120000,
    reuseExistingServer: false,
    // SIGTERM, not Playwright's default SIGKILL: the server then stops the engine it started (its block and
    // worker pool run in a session of their own) and the fake upstream (jupyter_server_test_config.py)
    gracefulShutdown: { signal: 'SIGTERM', timeout: 60000 },
    stdout: 'pipe',
    stderr: 'pipe'
  }
};
