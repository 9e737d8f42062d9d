import { describe, expect, it } from 'vitest';

import {
  asState,
  batchView,
  bestState,
  canWarm,
  describeFailure,
  downloadView,
  filterGroups,
  firstLine,
  groupByCluster,
  humanDuration,
  maintenanceBadge,
  modelDetails,
  publishedView,
  schedulerFacts,
  signInView
} from '../src/model';
import type { StatusReply } from '../src/model';
import { EMBED, LLAMA, QWEN, firstGateway } from './first-gateway';

const NOT_SIGNED_IN = { signed_in: false, source: null, identity: null, tokens: {}, help: 'Sign in with first login' };

/** Two clusters: llama on both (hot on polaris, cold on aurora), an embedder on polaris, a dead endpoint. */
function twoClusters(): StatusReply {
  return {
    default_model: 'llama',
    clusters: ['aurora', 'polaris'],
    models: [
      { id: 'nomic-embed', state: 'cold', served_by: [{ cluster: 'polaris', endpoint: 'embed', state: 'cold' }] },
      {
        id: 'llama', state: 'hot', served_by: [
          { cluster: 'polaris', endpoint: 'vllm-1', state: 'starting' },
          { cluster: 'polaris', endpoint: 'vllm-2', state: 'hot' },
          { cluster: 'aurora', endpoint: 'vllm', state: 'cold' }
        ]
      }
    ],
    endpoints: [
      { cluster: 'polaris', endpoint: 'vllm-1', state: 'starting', router: { ttft_ms: 812.5 } },
      { cluster: 'polaris', endpoint: 'vllm-2', state: 'running', router: { ttft_ms: 95 } },
      { cluster: 'polaris', endpoint: 'embed', state: 'stopped' },
      { cluster: 'aurora', endpoint: 'vllm', state: 'offline', error: 'Globus Compute endpoint is offline' }
    ],
    auth: NOT_SIGNED_IN
  };
}

describe('states', () => {
  it('takes the best state and reads unknown ones as offline', () => {
    expect(bestState(['cold', 'queued', 'offline'])).toBe('queued');
    expect(bestState([])).toBe('offline');
    expect(asState('hot')).toBe('hot');
    expect(asState('paused')).toBe('offline');
    expect(asState(undefined)).toBe('offline');
  });

  it('offers warm-up only to cold models', () => {
    expect(['hot', 'starting', 'queued', 'cold', 'offline'].filter(s => canWarm(asState(s)))).toEqual(['cold']);
  });

  it('offers no warm-up where every FIRST cluster serving the model is under maintenance', () => {
    expect(canWarm('cold', { clusters: ['sophia'], all: true })).toBe(false);
    expect(canWarm('cold', { clusters: ['sophia'], all: false })).toBe(true);
  });
});

describe('groupByCluster', () => {
  it('lists a model under each cluster with its state there, best first, and marks the default', () => {
    const groups = groupByCluster(twoClusters());
    expect(groups.map(g => g.cluster)).toEqual(['aurora', 'polaris']);
    const [aurora, polaris] = groups;
    expect(aurora.models.map(m => [m.id, m.state, m.isDefault])).toEqual([['llama', 'cold', true]]);
    expect(polaris.models.map(m => [m.id, m.state, m.isDefault])).toEqual([
      ['llama', 'hot', true], ['nomic-embed', 'cold', false]
    ]);
    expect(polaris.models[0].endpoints.map(e => e.endpoint)).toEqual(['vllm-1', 'vllm-2']);
  });

  it("carries a cluster's endpoint errors, so a cluster that is down reads as down", () => {
    const [aurora, polaris] = groupByCluster(twoClusters());
    expect(aurora.errors).toEqual(['vllm: Globus Compute endpoint is offline']);
    expect(polaris.errors).toEqual([]);
  });

  it("shows a model being downloaded for an endpoint with its bar, and what the gateway notes of it", () => {
    const status = twoClusters();
    status.endpoints[3].download = { repo: 'HuggingFaceTB/SmolLM2-360M-Instruct', state: 'downloading',
      done_bytes: 300 * 1024 * 1024, total_bytes: 720 * 1024 * 1024 };
    status.endpoints[3].note = 'serving the tiny offline model: the hub cannot be reached';
    const [aurora, polaris] = groupByCluster(status);
    expect(aurora.downloads).toEqual([{ endpoint: 'vllm', fraction: 300 / 720,
      label: 'Downloading HuggingFaceTB/SmolLM2-360M-Instruct: 300 of 720 MB.' }]);
    expect(aurora.notes).toEqual(['vllm: serving the tiny offline model: the hub cannot be reached']);
    expect([polaris.downloads, polaris.notes]).toEqual([[], []]);
    status.endpoints[3].download = { ...status.endpoints[3].download, state: 'done' };
    expect(groupByCluster(status)[0].downloads).toEqual([]);  // done: the bar goes
  });

  it('says a download that stopped, and one whose size is not known yet', () => {
    expect(downloadView('engine', { repo: 'r', state: 'failed', done_bytes: 0, total_bytes: 0, error: 'cut off' }))
      .toEqual({ endpoint: 'engine', fraction: null,
        label: 'Downloading r stopped: cut off; the next request resumes it.' });
    expect(downloadView('engine', { repo: 'r', state: 'waiting', done_bytes: 0, total_bytes: 0 }).label)
      .toBe('Downloading r: waiting to begin.');
  });

  it('puts the default cluster from the settings first, and ignores one that does not exist', () => {
    expect(groupByCluster(twoClusters(), 'polaris').map(g => g.cluster)).toEqual(['polaris', 'aurora']);
    expect(groupByCluster(twoClusters(), 'frontier').map(g => g.cluster)).toEqual(['aurora', 'polaris']);
  });

  it('keeps a configured cluster with no model, and adds a cluster only a model names', () => {
    const status = twoClusters();
    status.clusters = ['empty', 'polaris'];
    const groups = groupByCluster(status);
    expect(groups.map(g => [g.cluster, g.models.length])).toEqual([['empty', 0], ['polaris', 2], ['aurora', 1]]);
  });
});

describe('filterGroups', () => {
  const groups = groupByCluster(twoClusters());

  it('matches every word against model, cluster and state, case-insensitively', () => {
    const names = (filter: string) => filterGroups(groups, filter).map(g => [g.cluster, g.models.map(m => m.id)]);
    expect(names('LLAMA')).toEqual([['aurora', ['llama']], ['polaris', ['llama']]]);
    expect(names('llama hot')).toEqual([['polaris', ['llama']]]);
    expect(names('aurora')).toEqual([['aurora', ['llama']]]);
    expect(names('  cold  ')).toEqual([['aurora', ['llama']], ['polaris', ['nomic-embed']]]);
    expect(names('mistral')).toEqual([]);
  });

  it('returns every group, empty ones too, for an empty filter', () => {
    expect(filterGroups(groups, '   ')).toBe(groups);
  });
});

describe('modelDetails', () => {
  it("gives each endpoint's state and expected latency, and the model's tokens and last latency", () => {
    const status = twoClusters();
    const polaris = groupByCluster(status)[1];
    const usage = [{ model: 'llama', requests: 3, errors: 0, prompt_tokens: 30, completion_tokens: 12,
      mean_latency_ms: 200, last_latency_ms: 150.5, last_used: 1700000000 }];
    const details = modelDetails(polaris.models[0], 'polaris', status, usage);
    expect(details.endpoints).toEqual([
      { name: 'polaris/vllm-1', state: 'starting', ttftMs: 812.5, error: null },
      { name: 'polaris/vllm-2', state: 'hot', ttftMs: 95, error: null }
    ]);
    expect([details.requests, details.tokens, details.lastLatencyMs, details.lastUsed])
      .toEqual([3, 42, 150.5, 1700000000]);
  });

  it('says nothing was used for a model without usage, and shows an endpoint error', () => {
    const status = twoClusters();
    const aurora = groupByCluster(status)[0];
    const details = modelDetails(aurora.models[0], 'aurora', status, []);
    expect(details.endpoints[0].error).toBe('Globus Compute endpoint is offline');
    expect([details.requests, details.tokens, details.lastLatencyMs, details.lastUsed]).toEqual([0, 0, null, null]);
  });
});

describe('a FIRST gateway as a cluster', () => {
  const [alcf, lab] = groupByCluster(firstGateway());
  const model = (id: string) => alcf.models.find(m => m.id === id)!;

  it("marks a model under maintenance where every FIRST cluster serving it is, and partly where one is", () => {
    expect(model(QWEN).maintenance).toEqual({ clusters: ['sophia'], all: true });
    expect(model(LLAMA).maintenance).toEqual({ clusters: ['sophia'], all: false });
    expect(model(EMBED).maintenance).toBeNull();
    expect(lab.models[0].maintenance).toBeNull(); // no FIRST gateway behind it
    expect(groupByCluster(twoClusters())[1].models.map(m => m.maintenance)).toEqual([null, null]);
  });

  it("words the maintenance badge by what it means for the model's requests", () => {
    expect(maintenanceBadge({ clusters: ['sophia'], all: true })).toEqual({ label: 'under maintenance',
      help: 'FIRST says sophia is under maintenance: requests for this model fail until it ends.' });
    expect(maintenanceBadge({ clusters: ['sophia', 'crux'], all: false })).toEqual({
      label: 'maintenance: sophia, crux',
      help: 'FIRST says sophia, crux are under maintenance: requests for this model go to its other FIRST ' +
        'clusters meanwhile.' });
  });

  it('lets the filter find the models under maintenance', () => {
    const found = filterGroups([alcf, lab], 'maintenance');
    expect(found.map(g => [g.cluster, g.models.map(m => m.id)])).toEqual([['alcf', [LLAMA, QWEN]]]);
  });

  it("gives what FIRST publishes of the model and says of each of its clusters", () => {
    const details = modelDetails(model(LLAMA), 'alcf', firstGateway(), []);
    expect(details.published).toEqual({
      displayName: 'Llama 3.3 70B', description: 'Meta Llama 3.3, instruction-tuned.', facts: [
        { label: 'Protocols', value: 'chat completions, responses' },
        { label: 'Streaming', value: 'yes' },
        { label: 'Tool calling', value: 'yes' },
        { label: 'Context window', value: '131,072 tokens' },
        { label: 'Input', value: 'text' },
        { label: 'Tokens per minute', value: '200,000, 50,000 per user' }
      ]
    });
    expect(details.remote).toEqual([
      { name: 'sophia', via: 'alcf/gateway', maintenance: true, scheduler: [],
        jobsError: 'The FIRST gateway (GET /resource_server/sophia/jobs) answered 500: qstat failed on the login ' +
          'node\nmore lines' },
      { name: 'polaris', via: 'alcf/gateway', maintenance: false, jobsError: null, scheduler: [
        { label: 'Free nodes', value: '12' }, { label: 'Queued jobs', value: '3' },
        { label: 'Nodes gpu free', value: '40' }] }
    ]);
  });

  it('has no FIRST facts for a model that published nothing, or that no FIRST gateway serves', () => {
    const qwen = modelDetails(model(QWEN), 'alcf', firstGateway(), []);
    expect([qwen.published, qwen.remote.map(r => r.name)]).toEqual([null, ['sophia']]);
    const plain = modelDetails(lab.models[0], 'lab', firstGateway(), []);
    expect([plain.published, plain.remote]).toEqual([null, []]);
  });

  it('says a maintenance it was not told as unknown', () => {
    const status = firstGateway();
    delete status.endpoints[0].remote_clusters!.polaris.maintenance;
    const [group] = groupByCluster(status);
    const embed = group.models.find(m => m.id === EMBED)!;
    expect(embed.maintenance).toBeNull();
    expect(modelDetails(embed, 'alcf', status, []).remote[0].maintenance).toBeNull();
  });
});

describe('publishedView', () => {
  it('leaves out what is not in the shape FIRST documents, rather than show it wrong', () => {
    const odd = JSON.parse(JSON.stringify({ display_name: '  ', description: 7, capabilities: {
      api_protocols: 'chat', streaming: 'yes', tool_calling: { supported: 'maybe' }, context_window_tokens: '128k',
      input_modalities: [3, 'image'] } }));
    expect(publishedView(odd)).toEqual({ displayName: null, description: null,
      facts: [{ label: 'Input', value: 'image' }] });
    expect(publishedView(undefined)).toBeNull();
  });

  it('reads a plain flag as well as an object with `supported`', () => {
    const view = publishedView({ capabilities: { streaming: false, tool_calling: false } });
    expect(view?.facts).toEqual([{ label: 'Streaming', value: 'no' }, { label: 'Tool calling', value: 'no' }]);
    expect(publishedView({ rate_limit_token_per_minute_per_user: 1000 })?.facts)
      .toEqual([{ label: 'Tokens per minute', value: '1,000 per user' }]);
  });
});

describe('schedulerFacts', () => {
  it("shows the scheduler's numbers, words and flags, nested ones by their path, and nothing when it is silent", () => {
    expect(schedulerFacts({ free_nodes: 1024, state: 'draining', reservations: true, list: [1], gone: null,
      queue: { debug: { waiting: 2 } } })).toEqual([
      { label: 'Free nodes', value: '1,024' }, { label: 'State', value: 'draining' },
      { label: 'Reservations', value: 'true' }, { label: 'Queue debug waiting', value: '2' }]);
    expect(schedulerFacts(undefined)).toEqual([]);
  });
});

describe('batchView', () => {
  const batch = (status: string, counts: { total?: number; completed?: number; failed?: number } | null) => ({
    id: 'batch_1', status, endpoint: '/v1/chat/completions', created_at: 0, request_counts: counts
  });

  it('counts failed requests as answered and reports them', () => {
    const view = batchView(batch('in_progress', { total: 300, completed: 120, failed: 3 }));
    expect([view.done, view.total, view.failed, view.fraction, view.cancellable])
      .toEqual([123, 300, 3, 0.41, true]);
    expect(view.label).toBe('123/300 (41%), 3 failed');
  });

  it('has no fraction before the total is known, and cancel only while running', () => {
    const validating = batchView(batch('validating', null));
    expect([validating.fraction, validating.label, validating.cancellable]).toEqual([null, 'validating', true]);
    for (const status of ['completed', 'failed', 'cancelled', 'cancelling', 'expired']) {
      expect(batchView(batch(status, { total: 2, completed: 2 })).cancellable).toBe(false);
    }
    expect(batchView(batch('completed', { total: 2, completed: 2 })).label).toBe('2/2 (100%)');
  });

  it('says a running batch held down by interactive traffic is paused for it', () => {
    const held = batchView({ ...batch('in_progress', { total: 10, completed: 4 }), paused_for_interactive: true });
    expect([held.paused, held.label]).toEqual([true, '4/10 (40%), paused for interactive traffic']);
    const running = batchView({ ...batch('in_progress', { total: 10, completed: 4 }), paused_for_interactive: false });
    expect([running.paused, running.label]).toEqual([false, '4/10 (40%)']);
    const done = batchView({ ...batch('completed', { total: 10, completed: 10 }), paused_for_interactive: true });
    expect(done.paused).toBe(false);
  });
});

describe('signInView', () => {
  const now = 1_700_000_000;

  it('shows how to sign in when nobody is', () => {
    expect(signInView(NOT_SIGNED_IN, now)).toEqual({ signedIn: false, who: '', source: '', expiry: '',
      help: 'Sign in with first login' });
  });

  it('names the identity, the source in words and the soonest expiry', () => {
    const view = signInView({
      signed_in: true, source: 'hub_api', identity: { sub: 'abc', preferred_username: 'ada@uchicago.edu' },
      tokens: {
        'auth.globus.org': { expires_at: now + 7200, expired: false, refreshable: false },
        'funcx_service': { expires_at: now + 2520, expired: false, refreshable: false }
      }
    }, now);
    expect(view).toEqual({ signedIn: true, who: 'ada@uchicago.edu', source: "JupyterHub's Globus login",
      expiry: 'expires in 42 min', help: '' });
  });

  it('says when tokens have expired, and whether they renew themselves', () => {
    const expired = { expires_at: now - 5, expired: true, refreshable: false };
    const stale = signInView({ signed_in: true, source: 'env', identity: null, tokens: { x: expired } }, now);
    expect([stale.who, stale.expiry]).toEqual(['unknown identity', 'expired: sign in again']);
    const renewing = signInView({ signed_in: true, source: 'native', identity: { sub: 'abc' },
      tokens: { x: { ...expired, refreshable: true } } }, now);
    expect([renewing.who, renewing.source, renewing.expiry])
      .toEqual(['abc', 'a sign-in from this server', 'expired; renews itself on the next request']);
  });
});

describe('firstLine', () => {
  it("keeps an error's first line, and cuts a long one at a word", () => {
    expect(firstLine('  The engine (pid 7) exited.\nLast lines of the log:\nKilled\n')).toBe('The engine (pid 7) exited.');
    expect(firstLine('alpha beta gamma delta', 12)).toBe('alpha beta…');
    expect(firstLine('abcdefghijklmnop', 5)).toBe('abcde…');
  });
});

describe('humanDuration', () => {
  it('says durations the way people do', () => {
    expect([5, 59.6, 90, 3600, 3660 * 2, 7199, 172790, 50 * 3600, 10 * 86400].map(humanDuration))
      .toEqual(['5 s', '1 min', '2 min', '1 h', '2 h 2 min', '2 h', '48 h', '2 days', '10 days']);
  });
});

describe('describeFailure', () => {
  it("keeps the gateway's own message, which says what to do", () => {
    const body = JSON.stringify({ error: { message: "Model 'x' is not served here. Models: tiny-chat." } });
    expect(describeFailure('make x the default', 404, body))
      .toBe("Could not make x the default: Model 'x' is not served here. Models: tiny-chat.");
  });

  it('turns HTML and silence into sentences that say what to try', () => {
    expect(describeFailure('list the batches', 404, '<html>Not Found</html>'))
      .toContain('`jupyter server extension enable first_jupyter`');
    expect(describeFailure('warm up x', 403, '<html>Forbidden</html>')).toContain('Reload the page');
    expect(describeFailure('warm up x', 502, 'Bad Gateway')).toBe(
      'Could not warm up x: the server answered HTTP 502. Its log says more.');
    expect(describeFailure('read the usage', null, '')).toContain('did not answer');
  });
});
