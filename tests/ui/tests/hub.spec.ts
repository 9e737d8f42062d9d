/**
 * The FIRST sidebar behind a real JupyterHub, in Debian's Chromium: the user logs in through the hub's form on its
 * public URL (configurable-http-proxy), the hub spawns their server, and JupyterLab's sidebar lists the models of
 * the fake upstream and of a FIRST gateway's stand-in (maintenance, capabilities, free nodes), and the Globus
 * identity the hub's auth state gives. The hub and its stand-ins are started by `python -m tests.hub.serve_for_ui`
 * (see there), and stopped, by PID, when this file's tests end.
 */
import { type ChildProcess, spawn } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as readline from 'readline';

import { type Locator, type Page, expect, test } from '@playwright/test';

test.describe.configure({ mode: 'serial' });

const ROOT = path.resolve(__dirname, '..', '..', '..');
const ARTIFACTS = path.join(__dirname, '..', 'artifacts');
const PANEL = '#first-jupyter-panel';
const LLAMA = 'meta-llama/Llama-3.3-70B-Instruct';
const QWEN = 'Qwen/QwQ-32B';
/** As tests/waiting.py's ENGINE_GUARD_S: the hub's start and a server's spawn are the product's own waits. */
const START_MS = 600000;

interface Hub {
  url: string;
  user: string;
  password: string;
  log: string;
}

let server: ChildProcess | null = null;
let hub: Hub;

/** `python -m tests.hub.serve_for_ui`, once it printed READY; its input stays open while the tests need it. */
async function startHub(): Promise<Hub> {
  const state = process.env.FIRST_UI_STATE || fs.mkdtempSync(path.join(os.tmpdir(), 'first-ui-'));
  const child = spawn('python', ['-m', 'tests.hub.serve_for_ui'], {
    cwd: ROOT, env: { ...process.env, FIRST_UI_STATE: state }, stdio: ['pipe', 'pipe', 'inherit']
  });
  server = child;
  await new Promise<void>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', code => reject(new Error(`tests.hub.serve_for_ui exited (${code}) before it was ready`)));
    readline.createInterface({ input: child.stdout! }).on('line', line => {
      if (line === 'READY') {
        resolve();
      }
    });
  });
  return JSON.parse(fs.readFileSync(path.join(state, 'hub.json'), 'utf8')) as Hub;
}

/** Close its input, and wait for it to have stopped everything it started. */
async function stopHub(): Promise<void> {
  const child = server;
  server = null;
  if (!child || child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const exited = new Promise<number | null>(resolve => child.once('exit', code => resolve(code)));
  child.stdin!.end();
  expect(await exited, 'tests.hub.serve_for_ui stopped the hub and its stand-ins').toBe(0);
}

function row(page: Page, cluster: string, model: string): Locator {
  return page.locator(`${PANEL} .first-cluster[data-cluster="${cluster}"] .first-model[data-model="${model}"]`);
}

async function screenshot(panel: Locator, name: string): Promise<void> {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await panel.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

test.beforeAll(async () => {
  test.setTimeout(START_MS);
  hub = await startHub();
});

test.afterAll(async () => {
  test.setTimeout(START_MS);
  await stopHub();
});

test.describe('FIRST sidebar behind JupyterHub', () => {
  test('a user logs in through the hub, and the sidebar of their server lists the models and their identity',
    async ({ page }) => {
      test.setTimeout(START_MS);
      const lab = `${hub.url}/user/${hub.user}/lab`;
      // the hub's own login page, then its spawn of the user's server (where a login leads by default), then
      // JupyterLab: all on the hub's public URL
      await page.goto(`${hub.url}/hub/login`);
      await page.locator('#username_input').fill(hub.user);
      await page.locator('#password_input').fill(hub.password);
      await page.locator('#login_submit').click();
      await page.waitForURL(url => url.href.startsWith(lab), { timeout: START_MS });

      const tab = page.locator('.jp-SideBar [data-id="first-jupyter-panel"]');
      await expect(tab, `the sidebar's tab (the hub's log: ${hub.log})`).toBeVisible({ timeout: START_MS });
      if (!(await page.locator(PANEL).isVisible())) {
        await tab.click();
      }
      const panel = page.locator(PANEL);
      await expect(panel).toBeVisible();

      // the identity as the hub's auth state gives it, read by the server through the hub's API
      await expect(panel.locator('.first-identity')).toHaveText(`Signed in as ${hub.user}@uni.edu`);
      await expect(panel.locator('.first-signin')).toContainText("through JupyterHub's Globus login");
      // the fake upstream's model, and the FIRST gateway's, each sent the user's token by the server
      await expect(row(page, 'remote', 'fake-model').locator('.first-badge')).toHaveText('hot');
      await expect(row(page, 'alcf', LLAMA)).toHaveAttribute('data-state', 'hot'); // running on polaris
      await expect(row(page, 'alcf', LLAMA).locator('.first-maintenance')).toHaveText('maintenance: sophia');
      await expect(row(page, 'alcf', QWEN).locator('.first-maintenance')).toHaveText('under maintenance');
      await expect(row(page, 'alcf', QWEN)).toHaveAttribute('data-state', 'cold');
      await expect(row(page, 'alcf', QWEN).locator('.first-warm')).toHaveCount(0); // nowhere to start it
      await expect(panel.locator('.first-error')).toBeHidden();
      await screenshot(panel, 'hub-1-panel');

      await row(page, 'alcf', LLAMA).locator('.first-model-name').click();
      const details = panel.locator('.first-details');
      await expect(details.locator('.first-display-name')).toHaveText('Llama 3.3 70B');
      const capabilities = details.locator('.first-capabilities');
      await expect(capabilities.locator('dt')).toHaveText(['Protocols', 'Streaming', 'Tool calling',
        'Context window', 'Input', 'Tokens per minute']);
      await expect(capabilities.locator('dd')).toHaveText(['chat completions', 'yes', 'yes', '131,072 tokens',
        'text', '200,000']);
      const polaris = details.locator('.first-remote[data-remote-cluster="polaris"]');
      await expect(polaris).toContainText('FIRST cluster polaris (via alcf/gateway): up');
      await expect(polaris.locator('.first-scheduler dt')).toHaveText(['Free nodes', 'Queued jobs']);
      await expect(polaris.locator('.first-scheduler dd')).toHaveText(['12', '3']);
      await expect(details.locator('.first-remote[data-remote-cluster="sophia"]'))
        .toContainText('FIRST cluster sophia (via alcf/gateway): under maintenance');
      await screenshot(panel, 'hub-2-details');
    });
});
