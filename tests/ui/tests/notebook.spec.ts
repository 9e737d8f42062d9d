/**
 * What `%first` cells show in a notebook in a real JupyterLab in Debian's Chromium, against the Jupyter server of
 * jupyter_server_test_config.py: the usage plot, a streamed answer in Markdown, a cold start's status line, and
 * the batch monitor. The clusters are stand-ins whose pace the test sets: the fake upstream's gate ("remote") and
 * a FIRST gateway whose model's start is held until the test lets it go ("alcf", tests/ui/first_stand_in.py).
 * Every wait is on what the page shows. Screenshots of the cells go to tests/ui/artifacts.
 */
import * as fs from 'fs';
import * as path from 'path';

import { expect, test } from '@jupyterlab/galata';
import type { IJupyterLabPageFixture } from '@jupyterlab/galata';
import type { APIRequestContext, Locator } from '@playwright/test';

test.describe.configure({ mode: 'serial' });

const ARTIFACTS = path.join(__dirname, '..', 'artifacts');
/** tests/ui/first_stand_in.py: HOT answers in Markdown, COLD's start is held. */
const HOT = 'meta-llama/Llama-3.3-70B-Instruct';
const COLD = 'Qwen/QwQ-32B';

function stateFile(name: string): string {
  return fs.readFileSync(path.join(process.env.FIRST_UI_STATE ?? '', name), 'utf8').trim();
}

async function post(request: APIRequestContext, url: string, data: Record<string, unknown>): Promise<void> {
  const response = await request.post(url, { data });
  expect(response.ok(), await response.text()).toBeTruthy();
}

/** A command to the fake upstream's gate (bench/fake_upstream.py): hold its requests, release N, or open it. */
async function gate(request: APIRequestContext, command: Record<string, unknown>): Promise<void> {
  await post(request, `${stateFile('fake_upstream_url')}/gate`, command);
}

/** A new notebook whose first cell loads the extension (run), and then `cells` (not run). */
async function notebook(page: IJupyterLabPageFixture, name: string, cells: string[]): Promise<void> {
  await page.notebook.createNew(name);
  await page.notebook.setCell(0, 'code', '%load_ext first_jupyter');
  for (const cell of cells) {
    await page.notebook.addCell('code', cell);
  }
  await page.notebook.runCell(0);
}

async function output(page: IJupyterLabPageFixture, cell: number): Promise<Locator> {
  const locator = await page.notebook.getCellOutputLocator(cell);
  expect(locator).not.toBeNull();
  return locator as Locator;
}

async function screenshot(page: IJupyterLabPageFixture, cell: number, name: string): Promise<void> {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const locator = await page.notebook.getCellLocator(cell);
  await (locator as Locator).screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

test.describe('%first cells in a notebook', () => {
  test('%first usage draws its plot: one SVG image the browser decodes, with a size', async ({ page }) => {
    await notebook(page, 'usage.ipynb', ['%%first chat -m fake-model --max-tokens 8 --new\nSay hello.',
      '%first usage']);
    await page.notebook.runCell(1);
    await expect(await output(page, 1)).toContainText('tok0 tok1');
    await page.notebook.runCell(2);
    const plot = (await output(page, 2)).locator('.jp-RenderedSVG img');
    await expect(plot).toBeVisible();
    // an image the browser could not read (a document that is not well-formed XML) has no natural size
    await expect.poll(() => plot.evaluate((img: HTMLImageElement) => img.complete && img.naturalWidth > 0 &&
      img.naturalHeight > 0)).toBe(true);
    const box = await plot.boundingBox();
    expect(box?.width).toBeGreaterThan(0);
    expect(box?.height).toBeGreaterThan(0);
    await expect((await output(page, 2)).locator('table')).toContainText('fake-model');
    await screenshot(page, 2, 'notebook-1-usage-plot');
  });

  test('a streamed %%first chat answer renders as Markdown: its heading and list become HTML', async ({ page }) => {
    await notebook(page, 'markdown.ipynb', [`%%first chat -m ${HOT} --new\nSummarise the run.`]);
    await page.notebook.runCell(1);
    const answer = (await output(page, 1)).locator('.jp-RenderedMarkdown');
    await expect(answer.locator('h2')).toHaveText(/Findings/);
    await expect(answer.locator('li')).toHaveText(['the samples agree', 'the error is small']);
    await expect(answer).not.toContainText('##'); // no Markdown left as text
    await screenshot(page, 1, 'notebook-2-markdown-answer');
  });

  test('a cold start shows its status line, updated in place, until the answer replaces it', async ({ page }) => {
    // the gateway reads the cluster's jobs (as the sidebar's refresh does): COLD's is queued
    expect((await page.request.get('/first/api/status')).ok()).toBeTruthy();
    await notebook(page, 'cold-start.ipynb', [`%%first chat -m ${COLD} --new\nSay hello.`]);
    await page.notebook.runCell(1, { wait: false });
    const cell = await output(page, 1);
    const status = cell.getByText(`Waiting for model '${COLD}' on cluster 'alcf' endpoint 'gateway'`);
    await expect(status).toBeVisible();
    await expect(status).toContainText(/: (queued|starting), \d+ s so far, about .+ to go/);
    await expect(cell.locator('progress')).toBeVisible();
    await screenshot(page, 1, 'notebook-3-cold-start-waiting');
    const first = (await status.textContent()) ?? '';
    await expect(status).not.toHaveText(first); // the next report of the start (the time so far has grown)...
    await expect(cell.getByText('Waiting for model')).toHaveCount(1); // ...redrawn in place, not added below
    await expect(cell.locator('progress')).toHaveCount(1);

    await post(page.request, `${stateFile('first_control_url')}/release`, {}); // the job has started
    await expect(cell).toContainText('from sophia/vllm');
    await expect(cell).not.toContainText('Waiting for model');
    await expect(cell.locator('progress')).toHaveCount(0);
    await page.notebook.waitForRun(1);
    await screenshot(page, 1, 'notebook-4-cold-start-answered');
  });

  test('the batch monitor shows its bar part way, then done', async ({ page }) => {
    await notebook(page, 'batch.ipynb', ['prompts = [f"Question {i}" for i in range(4)]',
      '%first batch submit prompts -m fake-model --max-tokens 8 --monitor']);
    await page.notebook.runCell(1);
    // the batch's pace is the test's: its requests wait at the fake upstream's gate, one is let through, and the
    // monitor must show that part done (and no more, since the rest are held) before the gate opens
    await gate(page.request, { hold: true });
    try {
      await page.notebook.runCell(2);
      const monitor = await output(page, 2);
      const bar = monitor.locator('.widget-hprogress .progress-bar');
      await expect(monitor).toContainText('0 of 4 done');
      await gate(page.request, { release: 1 });
      await expect(monitor).toContainText('1 of 4 done');
      await expect(bar).toHaveAttribute('style', /width: 25%/);
      await expect(bar).toHaveClass(/progress-bar-info/);
      await expect(monitor).toContainText('in_progress');
      await screenshot(page, 2, 'notebook-5-batch-part-done');

      await gate(page.request, { open: true });
      await expect(monitor).toContainText('4 of 4 done');
      await expect(monitor).toContainText('completed');
      await expect(bar).toHaveAttribute('style', /width: 100%/);
      await expect(bar).toHaveClass(/progress-bar-success/);
      await expect(monitor.getByRole('button', { name: 'Cancel' })).toBeDisabled();
      await screenshot(page, 2, 'notebook-6-batch-done');
    } finally {
      await gate(page.request, { open: true });
    }
  });
});
