/**
 * The FIRST sidebar in a real JupyterLab in Debian's Chromium, against a real Jupyter server with the gateway:
 * the tiny model on the in-process Globus Compute engine (cluster "local") and the fake upstream ("remote").
 * The tests share that one server, so they run in order; screenshots of the panel go to tests/ui/artifacts.
 */
import * as fs from 'fs';
import * as path from 'path';

import { expect, test } from '@jupyterlab/galata';
import type { IJupyterLabPageFixture } from '@jupyterlab/galata';
import type { APIRequestContext, Locator } from '@playwright/test';

test.describe.configure({ mode: 'serial' });

const PANEL = '#first-jupyter-panel';
const ARTIFACTS = path.join(__dirname, '..', 'artifacts');
const SETTINGS = '/lab/api/settings/first-jupyter:plugin';
/** The fake upstream's fixed answer with `--chunks 8`: no tiny-model answer looks like it. */
const FAKE_ANSWER = 'tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7';
const ENGINE_START_MS = 240000;

function row(page: IJupyterLabPageFixture, cluster: string, model: string): Locator {
  return page.locator(`${PANEL} .first-cluster[data-cluster="${cluster}"] .first-model[data-model="${model}"]`);
}

async function openPanel(page: IJupyterLabPageFixture): Promise<Locator> {
  const panel = page.locator(PANEL);
  if (!(await panel.isVisible())) {
    await page.locator('.jp-SideBar [data-id="first-jupyter-panel"]').click();
  }
  await expect(panel).toBeVisible();
  return panel;
}

async function screenshot(panel: Locator, name: string): Promise<void> {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await panel.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

async function setRefreshInterval(request: APIRequestContext, seconds: number): Promise<void> {
  const raw = JSON.stringify({ refreshInterval: seconds });
  const response = await request.put(SETTINGS, { data: { raw } });
  expect(response.ok()).toBeTruthy();
}

/** A command to the fake upstream's gate (bench/fake_upstream.py): hold its requests, release N, or open it. */
async function gate(request: APIRequestContext, command: Record<string, unknown>): Promise<void> {
  const url = fs.readFileSync(path.join(process.env.FIRST_UI_STATE ?? '', 'fake_upstream_url'), 'utf8').trim();
  const response = await request.post(`${url}/gate`, { data: command });
  expect(response.ok(), await response.text()).toBeTruthy();
}

/** What a `%%first chat` answer says and which model the kernel says answered (the output's metadata). */
async function chatOutput(page: IJupyterLabPageFixture, cell: number): Promise<{ text: string; model: string }> {
  const text = ((await page.notebook.getCellTextOutput(cell)) ?? []).join('\n');
  const model = await page.evaluate((index: number) => {
    const app = (window as any).jupyterapp;
    const outputs = app.shell.currentWidget.content.widgets[index].model.outputs;
    for (let i = 0; i < outputs.length; i++) {
      const first = outputs.get(i).metadata?.first;
      if (first) {
        return String(first.model);
      }
    }
    return '';
  }, cell);
  return { text, model };
}

test.describe('FIRST sidebar', () => {
  test.use({ autoGoto: true });

  test("opens from its icon, lists the embedded default's model with its state, and is restored on reload",
    async ({ page }) => {
      const panel = await openPanel(page);
      const tiny = row(page, 'local', 'tiny-chat');
      await expect(tiny.locator('.first-badge')).toHaveText('cold');
      await expect(tiny).toHaveAttribute('data-state', 'cold');
      await expect(tiny.locator('.first-default-mark')).toHaveText('default');
      await expect(tiny.locator('.first-warm')).toBeVisible();
      await expect(row(page, 'remote', 'fake-model').locator('.first-badge')).toHaveText('hot');
      await expect(panel.locator('.first-cluster h3')).toHaveText(['alcf', 'local', 'remote']);
      await expect(panel.locator('.first-identity')).toHaveText('Not signed in to Globus');
      await screenshot(panel, '1-panel-cold');

      // the page again, without galata's `?reset` (which drops the saved layout) nor a `tree/` path (which
      // shows the file browser in the left area instead)
      await expect.poll(() => page.evaluate(async () => {
        const workspace = await (window as any).jupyterapp.serviceManager.workspaces.fetch('default');
        return workspace.data['layout-restorer:data']?.left?.current;
      })).toBe('first-jupyter-panel');
      // (the browser's own navigation: galata's `goto` waits for a launcher the restored layout may not show)
      await page.evaluate(() => window.location.assign('/lab'));
      await page.waitForURL(/\/lab$/);
      await expect(page.locator(PANEL)).toBeVisible({ timeout: 60000 });
      await expect(row(page, 'local', 'tiny-chat')).toBeVisible();
    });

  test('opens from the command palette, filters, and shows a model\'s details', async ({ page }) => {
    if (await page.locator(PANEL).isVisible()) {
      await page.locator('.jp-SideBar [data-id="first-jupyter-panel"]').click(); // collapse it first
    }
    await expect(page.locator(PANEL)).toBeHidden();
    await page.keyboard.press('Control+Shift+C');
    await page.locator('#command-palette .lm-CommandPalette-input').fill('Open the FIRST sidebar');
    await page.keyboard.press('Enter');
    const panel = page.locator(PANEL);
    await expect(panel).toBeVisible();

    await panel.locator('.first-filter').fill('remote');
    await expect(panel.locator('.first-model')).toHaveCount(1);
    await expect(panel.locator('.first-model')).toHaveAttribute('data-model', 'fake-model');
    await panel.locator('.first-filter').fill('no-such-model');
    await expect(panel.locator('.first-clusters')).toContainText('No model matches "no-such-model".');
    await panel.locator('.first-filter').fill('');

    await row(page, 'remote', 'fake-model').locator('.first-model-name').click();
    const details = panel.locator('.first-details');
    await expect(details).toContainText('remote/vllm-1: hot');
    // the server's own count (the notebook tests, which share this server, may have used the model already)
    const usage = (await (await page.request.get('/first/api/usage')).json()).data
      .find((row: { model: string }) => row.model === 'fake-model');
    const tokens = usage ? usage.prompt_tokens + usage.completion_tokens : 0;
    await expect(details).toContainText(`Tokens used: ${tokens.toLocaleString()} in ${usage?.requests ?? 0} requests`);
    await screenshot(panel, '2-panel-details');
  });

  test('refreshes on the interval from its settings: warm-up makes the model hot, a stopped engine turns it cold',
    async ({ page }) => {
      await setRefreshInterval(page.request, 1);
      await page.reload();
      const panel = await openPanel(page);
      const badge = row(page, 'local', 'tiny-chat').locator('.first-badge');
      await row(page, 'local', 'tiny-chat').locator('.first-warm').click();
      // no clicks from here on: only the panel's own refresh can show the new states
      await expect(badge).toHaveText('hot', { timeout: ENGINE_START_MS });
      await screenshot(panel, '3-panel-hot');

      const status = await (await page.request.get('/first/api/status')).json();
      const endpoint = status.endpoints.find((e: any) => e.cluster === 'local');
      const pid = JSON.parse(fs.readFileSync(path.join(endpoint.run_dir, 'engine.ready'), 'utf8')).pid;
      process.kill(pid, 'SIGKILL'); // the engine stops under its block, as on a crash or an out-of-memory kill
      await expect(badge).toHaveText('cold');
      await expect(panel.locator('.first-cluster[data-cluster="local"] .first-cluster-error'))
        .toContainText(`The engine (pid ${pid}) exited`);
      await screenshot(panel, '4-panel-engine-stopped');
    });

  test('choosing a model in the panel changes what a %%first chat cell uses', async ({ page }) => {
    const panel = await openPanel(page);
    await row(page, 'remote', 'fake-model').locator('.first-choose').check();
    await expect(row(page, 'remote', 'fake-model').locator('.first-default-mark')).toBeVisible();
    await expect(row(page, 'local', 'tiny-chat').locator('.first-default-mark')).toHaveCount(0);
    const chosen = await (await page.request.get('/first/api/default_model')).json();
    expect(chosen.default_model).toBe('fake-model');

    await page.notebook.createNew('chat.ipynb');
    await page.notebook.setCell(0, 'code', '%load_ext first_jupyter');
    await page.notebook.addCell('code', '%%first chat --max-tokens 8 --new\nSay hello.');
    await page.notebook.runCell(0);
    await page.notebook.runCell(1);
    const fake = await chatOutput(page, 1);
    expect(fake.model).toBe('fake-model');
    expect(fake.text).toContain(FAKE_ANSWER);
    await screenshot(panel, '5-panel-fake-model-chosen');

    // and back: the tiny model, whose engine was stopped above, is started again by this request
    await row(page, 'local', 'tiny-chat').locator('.first-choose').check();
    await expect(row(page, 'local', 'tiny-chat').locator('.first-default-mark')).toBeVisible();
    await page.notebook.runCell(1);
    const tiny = await chatOutput(page, 1);
    expect(tiny.model).toBe('tiny-chat');
    expect(tiny.text).not.toContain('tok0');
    await expect(row(page, 'local', 'tiny-chat').locator('.first-badge')).toHaveText('hot');
    await page.notebook.save();
  });

  test('a started batch shows its progress, and Cancel stops one', async ({ page }) => {
    const panel = await openPanel(page);
    const upload = async (lines: number): Promise<string> => {
      const body = Array.from({ length: lines }, (_, i) => JSON.stringify({
        custom_id: `request-${i}`, method: 'POST', url: '/v1/chat/completions',
        body: { model: 'fake-model', max_tokens: 24, messages: [{ role: 'user', content: `Question ${i}` }] }
      })).join('\n');
      const file = await page.request.post('/first/v1/files', {
        multipart: { purpose: 'batch', file: { name: 'prompts.jsonl', mimeType: 'application/jsonl',
          buffer: Buffer.from(body) } }
      });
      expect(file.ok()).toBeTruthy();
      const batch = await page.request.post('/first/v1/batches', {
        data: { input_file_id: (await file.json()).id, endpoint: '/v1/chat/completions', completion_window: '24h' }
      });
      expect(batch.ok()).toBeTruthy();
      return (await batch.json()).id;
    };

    // The batch's pace is the test's: its requests wait at the fake upstream's gate, 30 are let through, and the
    // panel must show that part done (and no more, since the rest are held) before the gate opens.
    await gate(page.request, { hold: true });
    try {
      const id = await upload(120);
      const entry = panel.locator(`.first-batch[data-batch="${id}"]`);
      const label = entry.locator('.first-batch-label');
      await expect(entry).toBeVisible();
      await gate(page.request, { release: 30 });
      await expect(label).toHaveText('30/120 (25%)');
      await expect(entry).toHaveAttribute('data-status', 'in_progress');
      await expect(entry.locator('progress')).toHaveJSProperty('value', 0.25);
      await screenshot(panel, '6-panel-batch-part-done');
      await gate(page.request, { open: true });
      await expect(entry).toHaveAttribute('data-status', 'completed');
      await expect(label).toHaveText('120/120 (100%)');
      await expect(entry.locator('progress')).toHaveJSProperty('value', 1);
      await screenshot(panel, '7-panel-batch-done');

      // Cancelled while every request it sent is held: those may finish once the gate opens, no other is sent.
      await gate(page.request, { hold: true });
      const held = await upload(200);
      const running = panel.locator(`.first-batch[data-batch="${held}"]`);
      await expect(running.locator('.first-cancel')).toBeVisible();
      await expect(running).toHaveAttribute('data-status', 'in_progress');
      await screenshot(panel, '8-panel-batch-running');
      await running.locator('.first-cancel').click();
      await expect(running).toHaveAttribute('data-status', /^(cancelling|cancelled)$/);
      await gate(page.request, { open: true });
      await expect(running).toHaveAttribute('data-status', 'cancelled');
      await expect(running.locator('.first-cancel')).toHaveCount(0);
      const cancelled = await (await page.request.get(`/first/v1/batches/${held}`)).json();
      expect(cancelled.request_counts.completed).toBeLessThan(200);
    } finally {
      await gate(page.request, { open: true });
    }
  });

  test('signs in with Globus without leaving JupyterLab, says a refused code in words, and signs out',
    async ({ page }) => {
      const panel = await openPanel(page);
      const signIn = panel.locator('.first-signin');
      const start = async (): Promise<string> => {
        const [popup] = await Promise.all([
          page.waitForEvent('popup'),
          signIn.getByRole('button', { name: 'Sign in with Globus' }).click()
        ]);
        const code = (await popup.locator('#auth-code').textContent()) ?? '';
        await popup.close();
        return code;
      };

      await start();
      await signIn.getByLabel('Authorization code').fill('mistyped-code');
      await signIn.getByRole('button', { name: 'Finish sign-in' }).click();
      const error = panel.locator('.first-error');
      await expect(error).toContainText('Could not finish the Globus sign-in: Globus did not accept the code');
      await expect(error).toContainText('Start the sign-in again');
      const updated = await panel.locator('.first-updated').textContent();
      await expect(panel.locator('.first-updated')).not.toHaveText(updated ?? ''); // a refresh has passed...
      await expect(error).toContainText('Globus did not accept the code'); // ...and the error is still there
      await screenshot(panel, '9-panel-sign-in-refused');

      await signIn.getByRole('button', { name: 'Cancel' }).click();
      const code = await start();
      expect(code).toBe('good-code');
      const field = signIn.getByLabel('Authorization code');
      await field.fill(code.slice(0, 4)); // half typed when a refresh comes
      const before = await panel.locator('.first-updated').textContent();
      await expect(panel.locator('.first-updated')).not.toHaveText(before ?? '');
      await expect(field).toHaveValue(code.slice(0, 4)); // the refresh kept it, and the focus
      await expect(field).toBeFocused();
      await screenshot(panel, '10-panel-sign-in-code');
      await field.fill(code);
      await signIn.getByRole('button', { name: 'Finish sign-in' }).click();
      await expect(panel.locator('.first-identity')).toHaveText('Signed in as ada@uni.edu');
      await expect(signIn).toContainText('through a sign-in from this server; expires in 48 h (renews itself)');
      await expect(error).toBeHidden();
      await screenshot(panel, '11-panel-signed-in');

      await signIn.getByRole('button', { name: 'Sign out' }).click();
      await expect(panel.locator('.first-identity')).toHaveText('Not signed in to Globus');
    });
});
