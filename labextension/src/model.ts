/**
 * The panel's data logic, free of JupyterLab and the DOM so that it is unit-tested on its own: the gateway's
 * answers (`/first/api/status`, `usage`, `/first/v1/batches`) turned into what the panel shows. The answers' types
 * are generated from the gateway's models (`api-types.generated.ts`, by `scripts/gen_types.py`).
 */

import type {
  BatchReply,
  EndpointStatus,
  ModelDownload,
  PublishedDetails,
  RemoteCluster,
  ServedBy,
  SignIn,
  StatusReply,
  UsageRow
} from './api-types.generated';

export type {
  BatchPage,
  BatchReply,
  EndpointStatus,
  ModelDownload,
  ModelEntry,
  PublishedDetails,
  RemoteCluster,
  ServedBy,
  SignIn,
  StatusReply,
  UsageRow,
  UsageSummary
} from './api-types.generated';

export const MODEL_STATES = ['hot', 'starting', 'queued', 'cold', 'offline'] as const;
export type ModelState = (typeof MODEL_STATES)[number];

/** How a FIRST gateway says a model calls tools: a flag, or an object with one. */
export interface ToolCalling {
  supported?: boolean;
}

/** A model's download as the panel draws it: a bar (null while its size is unknown) and a line of words. */
export interface DownloadView {
  endpoint: string;
  fraction: number | null;
  label: string;
}

/** The FIRST clusters under maintenance that serve a model; `all` when no other FIRST cluster serves it. */
export interface Maintenance {
  clusters: string[];
  all: boolean;
}

/** One model as listed under one cluster: its state there (the best among that cluster's endpoints). */
export interface ClusterModel {
  id: string;
  state: ModelState;
  isDefault: boolean;
  endpoints: ServedBy[];
  /** Null unless a FIRST cluster serving it here is under maintenance. */
  maintenance: Maintenance | null;
}

export interface ClusterGroup {
  cluster: string;
  models: ClusterModel[];
  /** Why the cluster's endpoints cannot be reached, in the gateway's words (empty when they can). */
  errors: string[];
  /** Models being downloaded for its endpoints, each with its bar. */
  downloads: DownloadView[];
  /** What the gateway says of its endpoints' models (`engine: the tiny offline model...`). */
  notes: string[];
}

const RANK: Record<ModelState, number> = { hot: 0, starting: 1, queued: 2, cold: 3, offline: 4 };

/** The gateway's state, or `offline` for one this panel does not know (a newer gateway's). */
export function asState(value: string | undefined | null): ModelState {
  return (MODEL_STATES as readonly string[]).includes(value ?? '') ? (value as ModelState) : 'offline';
}

export function bestState(states: Iterable<ModelState>): ModelState {
  let best: ModelState = 'offline';
  for (const state of states) {
    if (RANK[state] < RANK[best]) {
      best = state;
    }
  }
  return best;
}

/**
 * Models grouped by cluster, as the user thinks of them: a model served on two clusters is listed under both,
 * each time with its state there. `firstCluster` (the settings' default cluster) comes first; the rest follow
 * the gateway's order. Clusters with nothing to show are listed too, with their endpoints' errors, so that a
 * cluster that is down is seen as down rather than missing.
 */
export function groupByCluster(status: StatusReply, firstCluster = ''): ClusterGroup[] {
  const names = [...status.clusters];
  for (const model of status.models) {
    for (const where of model.served_by) {
      if (!names.includes(where.cluster)) {
        names.push(where.cluster);
      }
    }
  }
  if (firstCluster && names.includes(firstCluster)) {
    names.splice(names.indexOf(firstCluster), 1);
    names.unshift(firstCluster);
  }
  return names.map(cluster => {
    const models: ClusterModel[] = [];
    for (const model of status.models) {
      const here = model.served_by.filter(where => where.cluster === cluster);
      if (here.length) {
        models.push({
          id: model.id,
          state: bestState(here.map(where => asState(where.state))),
          isDefault: model.id === status.default_model,
          endpoints: here,
          maintenance: maintenanceOf(remoteClusters(model.id, cluster, here, status))
        });
      }
    }
    models.sort((a, b) => RANK[a.state] - RANK[b.state] || a.id.localeCompare(b.id));
    const here = status.endpoints.filter(endpoint => endpoint.cluster === cluster);
    const errors = here.filter(endpoint => endpoint.error).map(endpoint => `${endpoint.endpoint}: ${endpoint.error}`);
    const downloads = here.flatMap(endpoint => endpoint.download && endpoint.download.state !== 'done'
      ? [downloadView(endpoint.endpoint, endpoint.download)] : []);
    const notes = here.filter(endpoint => endpoint.note).map(endpoint => `${endpoint.endpoint}: ${endpoint.note}`);
    return { cluster, models, errors, downloads, notes };
  });
}

const MB = 1024 * 1024;

/** A download in words: which model, how far (MB of MB), or why it stopped (the next request resumes it). */
export function downloadView(endpoint: string, download: ModelDownload): DownloadView {
  const total = download.total_bytes > 0 ? download.total_bytes : null;
  const done = `${(download.done_bytes / MB).toFixed(0)}${total ? ` of ${(total / MB).toFixed(0)}` : ''} MB`;
  const label = download.state === 'failed'
    ? `Downloading ${download.repo} stopped: ${download.error ?? 'unknown error'}; the next request resumes it.`
    : download.state === 'waiting' ? `Downloading ${download.repo}: waiting to begin.`
      : `Downloading ${download.repo}: ${done}.`;
  return { endpoint, fraction: total ? Math.min(1, download.done_bytes / total) : null, label };
}

/** The FIRST clusters that serve `model` behind this cluster's endpoints, each with what its status says. */
function remoteClusters(model: string, cluster: string, endpoints: ServedBy[],
                        status: StatusReply): [string, RemoteCluster, EndpointStatus][] {
  const found: [string, RemoteCluster, EndpointStatus][] = [];
  for (const where of endpoints) {
    const info = status.endpoints.find(e => e.cluster === cluster && e.endpoint === where.endpoint);
    for (const [name, remote] of Object.entries(info?.remote_clusters ?? {})) {
      if (info && Array.isArray(remote.models) && remote.models.includes(model)) {
        found.push([name, remote, info]);
      }
    }
  }
  return found;
}

function maintenanceOf(remotes: [string, RemoteCluster, EndpointStatus][]): Maintenance | null {
  const down = remotes.filter(([, remote]) => remote.maintenance === true).map(([name]) => name);
  return down.length ? { clusters: down, all: down.length === remotes.length } : null;
}

/** The maintenance badge of a model's row: its text, and its tooltip (where, and what it means for requests). */
export function maintenanceBadge(maintenance: Maintenance): { label: string; help: string } {
  const where = maintenance.clusters.join(', ');
  const said = `FIRST says ${where} ${maintenance.clusters.length > 1 ? 'are' : 'is'} under maintenance: requests ` +
    'for this model';
  return maintenance.all
    ? { label: 'under maintenance', help: `${said} fail until it ends.` }
    : { label: `maintenance: ${where}`, help: `${said} go to its other FIRST clusters meanwhile.` };
}

/**
 * The groups narrowed to what the filter asks for: every word must appear in the model's id, its cluster's name,
 * its state or `maintenance` when it is under it (`llama hot`, `polaris`). Clusters left empty are dropped,
 * except when the filter is empty.
 */
export function filterGroups(groups: ClusterGroup[], filter: string): ClusterGroup[] {
  const words = filter.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) {
    return groups;
  }
  const kept: ClusterGroup[] = [];
  for (const group of groups) {
    const models = group.models.filter(model => {
      const text = `${model.id} ${group.cluster} ${model.state}${model.maintenance ? ' maintenance' : ''}`
        .toLowerCase();
      return words.every(word => text.includes(word));
    });
    if (models.length) {
      kept.push({ ...group, models });
    }
  }
  return kept;
}

/** What a badge says, for its tooltip: the state in words a user reads without knowing the gateway. */
export const STATE_HELP: Record<ModelState, string> = {
  hot: 'Hot: an engine is serving it now; requests answer at once.',
  starting: 'Starting: a node is loading it; requests wait for it.',
  queued: "Queued: waiting in the cluster's scheduler for a node.",
  cold: 'Cold: nothing runs it; the next request (or Warm up) starts it.',
  offline: 'Offline: its endpoint cannot be reached now.'
};

/**
 * Whether the warm-up action applies: a model that nothing runs or starts yet, where it can be started (not where
 * every FIRST cluster serving it is under maintenance).
 */
export function canWarm(state: ModelState, maintenance: Maintenance | null = null): boolean {
  return state === 'cold' && !maintenance?.all;
}

/** One line of a details box: a label and its value, in words. */
export interface Fact {
  label: string;
  value: string;
}

/** What a FIRST gateway publishes of a model, as the details box shows it. */
export interface PublishedView {
  displayName: string | null;
  description: string | null;
  /** Protocols, streaming, tools, context window, input modalities and token limits, where published. */
  facts: Fact[];
}

/** One FIRST cluster serving the model: its maintenance (null: not known) and what its scheduler says. */
export interface RemoteClusterView {
  name: string;
  /** Our endpoint in front of its gateway (`alcf/gateway`). */
  via: string;
  maintenance: boolean | null;
  /** Why its jobs could not be read, in the gateway's words; null when they were. */
  jobsError: string | null;
  scheduler: Fact[];
}

export interface ModelDetails {
  endpoints: { name: string; state: ModelState; ttftMs: number | null; error: string | null }[];
  published: PublishedView | null;
  remote: RemoteClusterView[];
  requests: number;
  tokens: number;
  lastLatencyMs: number | null;
  lastUsed: number | null;
}

const count = (n: number): string => n.toLocaleString('en-US');
const words = (key: string): string => key.replace(/_/g, ' ');
const capitalized = (text: string): string => text.charAt(0).toUpperCase() + text.slice(1);

function strings(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === 'string') : [];
}

/** A published flag: `true`, or `{"supported": true}` as FIRST writes `tool_calling`; null for anything else. */
function flag(value: unknown): boolean | null {
  if (typeof value === 'boolean') {
    return value;
  }
  const supported = value !== null && typeof value === 'object' ? (value as ToolCalling).supported : undefined;
  return typeof supported === 'boolean' ? supported : null;
}

/**
 * A model's published details in words. The facility writes them, so each is shown only when it has the type
 * FIRST documents: a value of another shape is left out rather than shown wrong.
 */
export function publishedView(details: PublishedDetails | null | undefined): PublishedView | null {
  if (!details) {
    return null;
  }
  const caps = details.capabilities ?? {};
  const facts: Fact[] = [];
  const protocols = strings(caps.api_protocols);
  if (protocols.length) {
    facts.push({ label: 'Protocols', value: protocols.map(words).join(', ') });
  }
  const streaming = flag(caps.streaming);
  if (streaming !== null) {
    facts.push({ label: 'Streaming', value: streaming ? 'yes' : 'no' });
  }
  const tools = flag(caps.tool_calling);
  if (tools !== null) {
    facts.push({ label: 'Tool calling', value: tools ? 'yes' : 'no' });
  }
  if (typeof caps.context_window_tokens === 'number' && Number.isFinite(caps.context_window_tokens)) {
    facts.push({ label: 'Context window', value: `${count(caps.context_window_tokens)} tokens` });
  }
  const modalities = strings(caps.input_modalities);
  if (modalities.length) {
    facts.push({ label: 'Input', value: modalities.join(', ') });
  }
  const perMinute = details.rate_limit_token_per_minute;
  const perUser = details.rate_limit_token_per_minute_per_user;
  if (typeof perMinute === 'number' || typeof perUser === 'number') {
    const parts = [typeof perMinute === 'number' && count(perMinute),
      typeof perUser === 'number' && `${count(perUser)} per user`].filter(Boolean);
    facts.push({ label: 'Tokens per minute', value: parts.join(', ') });
  }
  const text = (value: unknown): string | null => (typeof value === 'string' && value.trim() ? value : null);
  return { displayName: text(details.display_name), description: text(details.description), facts };
}

/** What a cluster's scheduler says, as facts: its numbers, words and flags; nested objects by their path. */
export function schedulerFacts(scheduler: Record<string, unknown> | undefined, prefix = ''): Fact[] {
  const facts: Fact[] = [];
  for (const [key, value] of Object.entries(scheduler ?? {})) {
    const label = prefix ? `${prefix}${words(key)}` : capitalized(words(key));
    if (typeof value === 'number') {
      facts.push({ label, value: count(value) });
    } else if (typeof value === 'string' || typeof value === 'boolean') {
      facts.push({ label, value: String(value) });
    } else if (value && typeof value === 'object' && !Array.isArray(value)) {
      facts.push(...schedulerFacts(value as Record<string, unknown>, `${label} `));
    }
  }
  return facts;
}

/**
 * A model's details on one cluster: each endpoint with its state and latency, what FIRST publishes of the model
 * and says of its clusters serving it (maintenance, scheduler), and the model's usage here.
 */
export function modelDetails(model: ClusterModel, cluster: string, status: StatusReply,
                             usage: UsageRow[]): ModelDetails {
  const endpoints = model.endpoints.map(where => {
    const info = status.endpoints.find(e => e.cluster === cluster && e.endpoint === where.endpoint);
    const ttft = info?.router?.ttft_ms;
    return {
      name: `${cluster}/${where.endpoint}`,
      state: asState(where.state),
      ttftMs: typeof ttft === 'number' ? ttft : null,
      error: info?.error ?? info?.router?.last_error ?? null
    };
  });
  const remote = remoteClusters(model.id, cluster, model.endpoints, status).map(([name, info, endpoint]) => ({
    name,
    via: `${endpoint.cluster}/${endpoint.endpoint}`,
    maintenance: typeof info.maintenance === 'boolean' ? info.maintenance : null,
    jobsError: info.jobs === 'read' ? null : info.jobs,
    scheduler: schedulerFacts(info.scheduler)
  }));
  const row = usage.find(r => r.model === model.id);
  return {
    endpoints,
    published: publishedView(status.models.find(m => m.id === model.id)?.details),
    remote,
    requests: row?.requests ?? 0,
    tokens: (row?.prompt_tokens ?? 0) + (row?.completion_tokens ?? 0),
    lastLatencyMs: row?.last_latency_ms ?? row?.mean_latency_ms ?? null,
    lastUsed: row?.last_used ?? null
  };
}

const ACTIVE = new Set(['validating', 'in_progress', 'finalizing']);

export interface BatchView {
  id: string;
  status: string;
  done: number;
  failed: number;
  total: number;
  /** 0..1, or null while the total is not known yet (a batch still validating its file). */
  fraction: number | null;
  label: string;
  cancellable: boolean;
  /** Its lines wait: interactive traffic holds its model's batch concurrency down (``gateway.admission``). */
  paused: boolean;
}

/** A batch as a progress row: answered (completed or failed) out of the total, and whether Cancel applies. */
export function batchView(batch: BatchReply): BatchView {
  const counts = batch.request_counts ?? {};
  const total = counts.total ?? 0;
  const failed = counts.failed ?? 0;
  const done = (counts.completed ?? 0) + failed;
  const fraction = total > 0 ? Math.min(1, done / total) : null;
  const failures = failed ? `, ${failed} failed` : '';
  const paused = batch.status === 'in_progress' && batch.paused_for_interactive === true;
  const progress = total > 0 ? `${done}/${total} (${Math.floor((fraction ?? 0) * 100)}%)${failures}` : batch.status;
  const label = paused ? `${progress}, paused for interactive traffic` : progress;
  return { id: batch.id, status: batch.status, done, failed, total, fraction, label,
    cancellable: ACTIVE.has(batch.status), paused };
}

/**
 * An error's first line, for the panel's narrow column; the whole text (an engine log's tail, say) goes in the
 * tooltip. Long lines are cut at a word.
 */
export function firstLine(text: string, limit = 240): string {
  const line = text.trim().split('\n', 1)[0].trim();
  if (line.length <= limit) {
    return line;
  }
  const cut = line.slice(0, limit);
  return `${cut.slice(0, cut.lastIndexOf(' ') > 0 ? cut.lastIndexOf(' ') : limit)}…`;
}

/** Durations as people say them: "45 s", "12 min", "3 h 5 min", "2 days". */
export function humanDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  if (s < 3600) {
    return `${Math.round(s / 60)} min`;
  }
  if (s < 2 * 86400) {
    const minutes = Math.round(s / 60); // rounded once, so 59.9 minutes past an hour read as the next hour
    const h = Math.floor(minutes / 60);
    const m = minutes % 60;
    return m ? `${h} h ${m} min` : `${h} h`;
  }
  return `${Math.round(s / 86400)} days`;
}

export interface SignInView {
  signedIn: boolean;
  who: string;
  source: string;
  /** "expires in 42 min", "expired", "renews itself" or "" when the gateway gave no expiry. */
  expiry: string;
  help: string;
}

const SOURCE_NAMES: Record<string, string> = {
  env: 'an access token in $FIRST_GLOBUS_TOKEN',
  hub_env: "JupyterHub's Globus login (from the server's start)",
  hub_api: "JupyterHub's Globus login",
  compute: 'your globus-compute login',
  native: 'a sign-in from this server'
};

/** Who is signed in, through what and until when, from the status's `auth` (as `/first/api/whoami`: never a token). */
export function signInView(auth: SignIn, nowSeconds: number): SignInView {
  if (!auth.signed_in) {
    return { signedIn: false, who: '', source: '', expiry: '', help: auth.help ?? '' };
  }
  const identity = auth.identity ?? {};
  const who = identity.preferred_username || identity.name || identity.email || identity.sub || 'unknown identity';
  const tokens = Object.values(auth.tokens ?? {}); // (none in a shared gateway's answer: its caller's identity)
  const expiries = tokens.map(t => t.expires_at).filter((t): t is number => typeof t === 'number');
  let expiry = '';
  if (tokens.length && tokens.every(t => t.expired && !t.refreshable)) {
    expiry = 'expired: sign in again';
  } else if (expiries.length) {
    const soonest = Math.min(...expiries);
    const refreshable = tokens.some(t => t.refreshable);
    expiry = soonest <= nowSeconds
      ? (refreshable ? 'expired; renews itself on the next request' : 'expired: sign in again')
      : `expires in ${humanDuration(soonest - nowSeconds)}${refreshable ? ' (renews itself)' : ''}`;
  }
  const source = auth.source ? (SOURCE_NAMES[auth.source] ?? auth.source) : '';
  return { signedIn: true, who, source, expiry, help: '' };
}

/**
 * A failed call in plain words. The gateway answers errors in OpenAI's shape (`{"error": {"message"}}`), whose
 * message already says what to do; anything else (Jupyter's own HTML, a proxy's page, no answer at all) is
 * turned into a sentence that says what happened and what to try.
 */
export function describeFailure(what: string, status: number | null, body: string): string {
  if (status === null) {
    return `Could not ${what}: the Jupyter server did not answer. Check that it is still running, then press ` +
      'Refresh.';
  }
  try {
    const parsed = JSON.parse(body) as { error?: { message?: string } | string; message?: string };
    const message = typeof parsed.error === 'string' ? parsed.error : parsed.error?.message ?? parsed.message;
    if (message) {
      return `Could not ${what}: ${message}`;
    }
  } catch {
    // not JSON: described by its status below
  }
  if (status === 401 || status === 403) {
    return `Could not ${what}: the Jupyter server refused the request (HTTP ${status}). Reload the page to sign ` +
      'in to Jupyter again.';
  }
  if (status === 404) {
    return `Could not ${what}: the FIRST server extension is not enabled on this Jupyter server (HTTP 404). ` +
      'Run `jupyter server extension enable first_jupyter` and restart the server.';
  }
  return `Could not ${what}: the server answered HTTP ${status}. Its log says more.`;
}
