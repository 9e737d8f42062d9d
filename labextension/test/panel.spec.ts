// @vitest-environment happy-dom
/**
 * The panel's rendering of what a FIRST gateway says, in a DOM (happy-dom): the real panel and API client, with
 * only the HTTP answers of the Jupyter server given (ServerConnection's `fetch`).
 */
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';
import { afterEach, describe, expect, it } from 'vitest';

import { GatewayApi } from '../src/api';
import type { StatusReply } from '../src/model';
import { FirstPanel } from '../src/panel';
import { EMBED, LLAMA, QWEN, firstGateway } from './first-gateway';

const BASE = 'http://127.0.0.1:8888/user/ada/';

/** The Jupyter server's answers: the status given, no usage, no batch; every path asked is kept. */
function serving(status: StatusReply, asked: string[]): ServerConnection.ISettings {
  const answer = async (input: RequestInfo | URL): Promise<Response> => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    asked.push(url.pathname);
    const body = url.pathname.endsWith('/first/api/status') ? status : { object: 'list', data: [] };
    return new Response(JSON.stringify(body), { status: 200, headers: { 'Content-Type': 'application/json' } });
  };
  return ServerConnection.makeSettings({ baseUrl: BASE, fetch: answer as typeof fetch });
}

const panels: FirstPanel[] = [];

async function shown(status: StatusReply): Promise<{ panel: FirstPanel; asked: string[] }> {
  const asked: string[] = [];
  const panel = new FirstPanel(new GatewayApi(serving(status, asked)), { refreshSeconds: 0, defaultCluster: '' });
  panels.push(panel);
  Widget.attach(panel, document.body); // which starts a reading; this waits for one begun after it
  await panel.refresh();
  return { panel, asked };
}

function row(panel: FirstPanel, cluster: string, model: string): HTMLElement {
  const found = panel.node.querySelector<HTMLElement>(
    `.first-cluster[data-cluster="${cluster}"] .first-model[data-model="${model}"]`);
  expect(found, `${cluster}/${model} listed`).not.toBeNull();
  return found!;
}

/** Open a model's details as a user does (a click on its name) and return the box. */
async function details(panel: FirstPanel, cluster: string, model: string): Promise<HTMLElement> {
  row(panel, cluster, model).querySelector<HTMLElement>('.first-model-name')!.click();
  const box = row(panel, cluster, model).closest('.first-model-box')?.querySelector<HTMLElement>('.first-details');
  expect(box, `the details of ${model}`).toBeTruthy();
  return box!;
}

function facts(list: Element | null): string[][] {
  const terms = [...(list?.querySelectorAll('dt') ?? [])].map(dt => dt.textContent);
  const values = [...(list?.querySelectorAll('dd') ?? [])].map(dd => dd.textContent);
  return terms.map((term, i) => [term ?? '', values[i] ?? '']);
}

afterEach(() => {
  panels.splice(0).forEach(panel => panel.dispose());
});

describe('the panel with a FIRST gateway as a cluster', () => {
  it('reads the Jupyter server it is served by, under its base URL', async () => {
    const { asked } = await shown(firstGateway());
    expect(new Set(asked)).toEqual(new Set(['/user/ada/first/api/status', '/user/ada/first/api/usage',
      '/user/ada/first/v1/batches']));
  });

  it("shows a maintenance badge on the rows of models a FIRST cluster under maintenance serves", async () => {
    const { panel } = await shown(firstGateway());
    const qwen = row(panel, 'alcf', QWEN);
    expect(qwen.dataset.maintenance).toBe('sophia');
    const badge = qwen.querySelector('.first-maintenance');
    expect(badge?.textContent).toBe('under maintenance');
    expect(badge?.getAttribute('title')).toContain('requests for this model fail until it ends');
    expect(row(panel, 'alcf', LLAMA).querySelector('.first-maintenance')?.textContent).toBe('maintenance: sophia');
    expect(row(panel, 'alcf', EMBED).querySelector('.first-maintenance')).toBeNull();
    expect(row(panel, 'alcf', EMBED).dataset.maintenance).toBeUndefined();
    expect(row(panel, 'lab', 'fake-model').querySelector('.first-maintenance')).toBeNull();
    expect(qwen.querySelector('.first-warm')).toBeNull(); // cold, but nowhere to start it
    expect(row(panel, 'alcf', EMBED).querySelector('.first-warm')).not.toBeNull();
  });

  it("shows in a model's details its display name, capabilities, and each FIRST cluster's state", async () => {
    const { panel } = await shown(firstGateway());
    const box = await details(panel, 'alcf', LLAMA);
    expect(box.querySelector('.first-display-name')?.textContent).toBe('Llama 3.3 70B');
    expect(box.querySelector('.first-published')?.textContent).toContain('Meta Llama 3.3, instruction-tuned.');
    expect(facts(box.querySelector('.first-capabilities'))).toEqual([
      ['Protocols', 'chat completions, responses'], ['Streaming', 'yes'], ['Tool calling', 'yes'],
      ['Context window', '131,072 tokens'], ['Input', 'text'], ['Tokens per minute', '200,000, 50,000 per user']]);

    const sophia = box.querySelector('.first-remote[data-remote-cluster="sophia"]');
    expect(sophia?.textContent).toContain('FIRST cluster sophia (via alcf/gateway): under maintenance');
    expect(sophia?.querySelector('.first-maintenance-text')?.textContent).toBe('under maintenance');
    const jobs = sophia?.querySelector('.first-cluster-error');
    expect(jobs?.textContent).toBe('Its jobs could not be read: The FIRST gateway (GET ' +
      '/resource_server/sophia/jobs) answered 500: qstat failed on the login node');
    expect(jobs?.getAttribute('title')).toContain('more lines'); // the whole text, in the tooltip

    const polaris = box.querySelector('.first-remote[data-remote-cluster="polaris"]');
    expect(polaris?.textContent).toContain('FIRST cluster polaris (via alcf/gateway): up');
    expect(facts(polaris!.querySelector('.first-scheduler')))
      .toEqual([['Free nodes', '12'], ['Queued jobs', '3'], ['Nodes gpu free', '40']]);
  });

  it('shows no FIRST section for a model of another kind of cluster, nor capabilities that were not published',
    async () => {
      const { panel } = await shown(firstGateway());
      const plain = await details(panel, 'lab', 'fake-model');
      expect(plain.querySelector('.first-published, .first-remote')).toBeNull();
      expect(plain.textContent).toContain('lab/vllm-1: hot');
      const qwen = await details(panel, 'alcf', QWEN);
      expect(qwen.querySelector('.first-published')).toBeNull();
      expect(qwen.querySelectorAll('.first-remote')).toHaveLength(1);
    });

  it('shows the maintenance FIRST lifts at the next reading', async () => {
    const status = firstGateway();
    const { panel } = await shown(status);
    expect(row(panel, 'alcf', QWEN).querySelector('.first-maintenance')).not.toBeNull();
    status.endpoints[0].remote_clusters!.sophia.maintenance = false;
    await panel.refresh();
    expect(row(panel, 'alcf', QWEN).querySelector('.first-maintenance')).toBeNull();
    expect(row(panel, 'alcf', QWEN).dataset.maintenance).toBeUndefined();
  });
});
