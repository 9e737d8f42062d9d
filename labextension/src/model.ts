/**
 * The panel's data logic, free of JupyterLab and the DOM so that it is unit-tested on its own: the gateway's
 * answers (`/first/api/status`, `usage`, `/first/v1/batches`) turned into what the panel shows.
 */

export const MODEL_STATES = ['hot', 'starting', 'queued', 'cold', 'offline'] as const;
export type ModelState = (typeof MODEL_STATES)[number];

export interface ServedBy {
  cluster: string;
  endpoint: string;
  state: ModelState;
}

export interface ModelInfo {
  id: string;
  capabilities?: string[];
  state: ModelState;
  served_by: ServedBy[];
}

export interface EndpointInfo {
  cluster: string;
  endpoint: string;
  kind?: string;
  state: string;
  error?: string | null;
  router?: { in_flight?: number; ttft_ms?: number; failures?: number; last_error?: string | null };
}

export interface TokenInfo {
  expires_at?: number | null;
  expired?: boolean;
  refreshable?: boolean;
}

export interface AuthInfo {
  signed_in: boolean;
  source: string | null;
  identity: Record<string, string> | null;
  tokens: Record<string, TokenInfo>;
  help?: string;
}

export interface StatusReply {
  default_model: string | null;
  models: ModelInfo[];
  endpoints: EndpointInfo[];
  clusters: string[];
  auth: AuthInfo;
}

export interface UsageRow {
  model: string;
  requests: number;
  errors: number;
  prompt_tokens: number;
  completion_tokens: number;
  mean_latency_ms: number | null;
  last_latency_ms?: number | null;
  last_used: number | null;
}

export interface Batch {
  id: string;
  status: string;
  endpoint: string;
  created_at: number;
  request_counts?: { total?: number; completed?: number; failed?: number } | null;
  metadata?: Record<string, string> | null;
}

/** One model as listed under one cluster: its state there (the best among that cluster's endpoints). */
export interface ClusterModel {
  id: string;
  state: ModelState;
  isDefault: boolean;
  endpoints: ServedBy[];
}

export interface ClusterGroup {
  cluster: string;
  models: ClusterModel[];
  /** Why the cluster's endpoints cannot be reached, in the gateway's words (empty when they can). */
  errors: string[];
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
          endpoints: here
        });
      }
    }
    models.sort((a, b) => RANK[a.state] - RANK[b.state] || a.id.localeCompare(b.id));
    const errors = status.endpoints
      .filter(endpoint => endpoint.cluster === cluster && endpoint.error)
      .map(endpoint => `${endpoint.endpoint}: ${endpoint.error}`);
    return { cluster, models, errors };
  });
}

/**
 * The groups narrowed to what the filter asks for: every word must appear in the model's id, its cluster's name
 * or its state (`llama hot`, `polaris`). Clusters left empty are dropped, except when the filter is empty.
 */
export function filterGroups(groups: ClusterGroup[], filter: string): ClusterGroup[] {
  const words = filter.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) {
    return groups;
  }
  const kept: ClusterGroup[] = [];
  for (const group of groups) {
    const models = group.models.filter(model => {
      const text = `${model.id} ${group.cluster} ${model.state}`.toLowerCase();
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

/** Whether the warm-up action applies: a model that nothing runs or starts yet. */
export function canWarm(state: ModelState): boolean {
  return state === 'cold';
}

export interface ModelDetails {
  endpoints: { name: string; state: ModelState; ttftMs: number | null; error: string | null }[];
  requests: number;
  tokens: number;
  lastLatencyMs: number | null;
  lastUsed: number | null;
}

/** A model's details on one cluster: each endpoint with its state and latency, and the model's usage here. */
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
  const row = usage.find(r => r.model === model.id);
  return {
    endpoints,
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
}

/** A batch as a progress row: answered (completed or failed) out of the total, and whether Cancel applies. */
export function batchView(batch: Batch): BatchView {
  const counts = batch.request_counts ?? {};
  const total = counts.total ?? 0;
  const failed = counts.failed ?? 0;
  const done = (counts.completed ?? 0) + failed;
  const fraction = total > 0 ? Math.min(1, done / total) : null;
  const failures = failed ? `, ${failed} failed` : '';
  const label = total > 0 ? `${done}/${total} (${Math.floor((fraction ?? 0) * 100)}%)${failures}` : batch.status;
  return { id: batch.id, status: batch.status, done, failed, total, fraction, label,
    cancellable: ACTIVE.has(batch.status) };
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
export function signInView(auth: AuthInfo, nowSeconds: number): SignInView {
  if (!auth.signed_in) {
    return { signedIn: false, who: '', source: '', expiry: '', help: auth.help ?? '' };
  }
  const identity = auth.identity ?? {};
  const who = identity.preferred_username || identity.name || identity.email || identity.sub || 'unknown identity';
  const tokens = Object.values(auth.tokens);
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
