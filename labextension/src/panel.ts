/**
 * The FIRST sidebar: sign-in, models by cluster (choose, warm up, details) and batches. It renders the gateway's
 * answers through `model.ts`; every action calls the gateway and then refreshes, so what the panel shows is
 * always what the server says, never a guess.
 */
import { Widget } from '@lumino/widgets';

import { GatewayApi, GatewayCallError } from './api';
import {
  STATE_HELP,
  batchView,
  canWarm,
  filterGroups,
  firstLine,
  groupByCluster,
  maintenanceBadge,
  modelDetails,
  signInView
} from './model';
import type { BatchReply, ClusterModel, Fact, ModelDetails, StatusReply, UsageRow } from './model';

export interface PanelOptions {
  refreshSeconds: number;
  defaultCluster: string;
}

const BATCHES_SHOWN = 10;

type Child = Node | string | null | undefined | false;

/** A DOM element with attributes and children: enough to build the panel without a framework. */
function h(tag: string, attrs: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    element.setAttribute(name, value);
  }
  for (const child of children) {
    if (child) {
      element.append(child);
    }
  }
  return element;
}

function button(label: string, title: string, onClick: () => void, cls = ''): HTMLButtonElement {
  const element = h('button', { class: `jp-Button first-button ${cls}`.trim(), title, type: 'button' },
    label) as HTMLButtonElement;
  element.addEventListener('click', event => {
    event.stopPropagation();
    onClick();
  });
  return element;
}

function describe(error: unknown): string {
  return error instanceof GatewayCallError ? error.message
    : `Something went wrong in the panel: ${String(error)}. Press Refresh; if it stays, reload the page.`;
}

/** Facts as a definition list, one line each. */
function facts(list: Fact[], cls: string): HTMLElement {
  return h('dl', { class: `first-facts ${cls}` },
    ...list.flatMap(fact => [h('dt', {}, fact.label), h('dd', {}, fact.value)]));
}

/**
 * What FIRST publishes of the model (display name, description, capabilities) and says of its clusters serving
 * it (maintenance, the scheduler's free nodes and queued jobs): nothing for a model on no FIRST gateway.
 */
function firstFacts(details: ModelDetails): Child[] {
  const published = details.published;
  const shown: Child[] = [];
  if (published) {
    shown.push(h('div', { class: 'first-published' },
      published.displayName && h('div', { class: 'first-display-name' }, published.displayName),
      published.description && h('div', { class: 'first-muted' }, published.description),
      published.facts.length > 0 && facts(published.facts, 'first-capabilities')));
  }
  for (const remote of details.remote) {
    const state = remote.maintenance === null ? 'maintenance not known'
      : remote.maintenance ? 'under maintenance' : 'up';
    shown.push(h('div', { class: 'first-remote', 'data-remote-cluster': remote.name },
      h('div', {}, 'FIRST cluster ', h('strong', {}, remote.name), ` (via ${remote.via}): `,
        h('span', { class: remote.maintenance ? 'first-maintenance-text' : '' }, state)),
      remote.scheduler.length > 0 && facts(remote.scheduler, 'first-scheduler'),
      remote.jobsError && h('div', { class: 'first-cluster-error', title: remote.jobsError },
        `Its jobs could not be read: ${firstLine(remote.jobsError)}`)));
  }
  return shown;
}

function formatMs(ms: number | null): string {
  if (ms === null) {
    return '–';
  }
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

export class FirstPanel extends Widget {
  private readonly api: GatewayApi;
  private options: PanelOptions;
  private status: StatusReply | null = null;
  private usage: UsageRow[] = [];
  private batches: BatchReply[] = [];
  private readonly expanded = new Set<string>();
  private timer: number | null = null;
  private refreshing: Promise<void> | null = null;
  private next: Promise<void> | null = null;
  private signInShown = '';
  private loginUrl: string | null = null;
  /** A failed read of the gateway: cleared by the next read that works. */
  private loadError = '';
  /** A failed action (choose, warm up, cancel, sign in): kept until the next action, whatever refreshes pass. */
  private actionError = '';

  private readonly errorBox = h('div', { class: 'first-error', role: 'alert' });
  private readonly signIn = h('section', { class: 'first-signin' });
  private readonly clusters = h('section', { class: 'first-clusters' });
  private readonly batchList = h('section', { class: 'first-batches' });
  private readonly updated = h('span', { class: 'first-updated' });
  private readonly filter = h('input', {
    class: 'jp-mod-styled first-filter', type: 'search', placeholder: 'Filter models (name, cluster, state)',
    'aria-label': 'Filter models'
  }) as HTMLInputElement;

  constructor(api: GatewayApi, options: PanelOptions) {
    super();
    this.api = api;
    this.options = options;
    this.id = 'first-jupyter-panel';
    this.addClass('first-panel');
    this.title.caption = 'FIRST: models, clusters and batches';
    this.filter.addEventListener('input', () => this.renderClusters());
    const header = h('header', { class: 'first-header' },
      h('h2', {}, 'FIRST inference'),
      this.updated,
      button('Refresh', 'Read the clusters, models and batches again', () => void this.refresh(), 'first-refresh'));
    this.node.append(header, this.errorBox, this.signIn, this.filter, this.clusters,
      h('h3', {}, 'Batches'), this.batchList);
    this.errorBox.hidden = true;
  }

  /** New settings take effect at once: the timer restarts with the new interval, the groups re-order. */
  configure(options: PanelOptions): void {
    this.options = options;
    this.schedule();
    this.renderClusters();
  }

  protected onAfterAttach(): void {
    this.schedule();
    void this.refresh();
  }

  protected onBeforeDetach(): void {
    this.stopTimer();
  }

  dispose(): void {
    this.stopTimer();
    super.dispose();
  }

  private stopTimer(): void {
    if (this.timer !== null) {
      window.clearInterval(this.timer);
      this.timer = null;
    }
  }

  private schedule(): void {
    this.stopTimer();
    if (this.options.refreshSeconds > 0 && this.isAttached) {
      this.timer = window.setInterval(() => {
        if (this.isVisible && !this.refreshing) { // a slow gateway is not asked again while it answers
          void this.refresh();
        }
      }, this.options.refreshSeconds * 1000);
    }
  }

  /**
   * Read status, usage and batches together, in a reading begun after this call (what an action just changed
   * shows); one reading at a time: asked during one, one more follows it, shared by all who asked meanwhile.
   */
  refresh(): Promise<void> {
    if (!this.refreshing) {
      this.refreshing = this.load().finally(() => {
        this.refreshing = null;
      });
      return this.refreshing;
    }
    this.next ??= this.refreshing.then(() => {
      this.next = null;
      return this.refresh();
    });
    return this.next;
  }

  private async load(): Promise<void> {
    this.node.classList.add('first-loading');
    try {
      const [status, usage, batches] = await Promise.all([
        this.api.status(), this.api.usage(), this.api.batches(BATCHES_SHOWN)
      ]);
      this.status = status;
      this.usage = usage;
      this.batches = batches;
      this.loadError = '';
      this.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      this.loadError = describe(error);
    } finally {
      this.node.classList.remove('first-loading');
    }
    this.render();
  }

  private showErrors(): void {
    const text = this.actionError || this.loadError;
    this.errorBox.textContent = text;
    this.errorBox.hidden = !text;
  }

  /** Run an action, show its failure in the panel, then show the state it left. */
  private async act(action: () => Promise<unknown>): Promise<void> {
    this.actionError = '';
    try {
      await action();
    } catch (error) {
      this.actionError = describe(error);
      this.render(); // the panel as it was (a clicked choice that failed is unchecked again)
      return;
    }
    await this.refresh();
  }

  private render(): void {
    this.showErrors();
    this.renderSignIn();
    this.renderClusters();
    this.renderBatches();
  }

  private renderSignIn(): void {
    const auth = this.status?.auth;
    const view = auth ? signInView(auth, Date.now() / 1000) : null;
    const shown = JSON.stringify([view, this.loginUrl]);
    if (shown === this.signInShown) {
      return; // unchanged: a code being typed keeps its text and focus through refreshes
    }
    this.signInShown = shown;
    this.signIn.replaceChildren();
    if (!view) {
      return;
    }
    if (view.signedIn) {
      this.signIn.append(
        h('div', { class: 'first-identity' }, 'Signed in as ', h('strong', {}, view.who)),
        h('div', { class: 'first-muted' }, [view.source && `through ${view.source}`, view.expiry]
          .filter(Boolean).join('; ')),
        button('Sign out', 'Forget the sign-in made from this server', () => void this.act(() => this.api.logout())));
      return;
    }
    this.signIn.append(h('div', { class: 'first-identity' }, 'Not signed in to Globus'));
    if (this.loginUrl === null) {
      this.signIn.append(
        h('div', { class: 'first-muted' }, 'Clusters reached through Globus need a sign-in.'),
        button('Sign in with Globus', 'Open the Globus sign-in page, then paste the code it shows here',
          () => void this.act(async () => {
            this.loginUrl = await this.api.loginStart();
            window.open(this.loginUrl, '_blank', 'noopener');
          })));
      return;
    }
    const code = h('input', {
      class: 'jp-mod-styled first-code', placeholder: 'Paste the authorization code', 'aria-label': 'Authorization code'
    }) as HTMLInputElement;
    const finish = (): void => void this.act(async () => {
      await this.api.loginFinish(code.value);
      this.loginUrl = null;
    });
    code.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        finish();
      }
    });
    this.signIn.append(
      h('div', { class: 'first-muted' }, 'Sign in on the ',
        h('a', { href: this.loginUrl, target: '_blank', rel: 'noopener' }, 'Globus page'),
        ', then paste the code it shows:'),
      code,
      button('Finish sign-in', 'Exchange the code for tokens kept by this server', finish),
      button('Cancel', 'Stop this sign-in', () => {
        this.loginUrl = null;
        this.actionError = '';
        this.render();
      }));
  }

  private renderClusters(): void {
    const status = this.status;
    this.clusters.replaceChildren();
    if (!status) {
      return;
    }
    const groups = filterGroups(groupByCluster(status, this.options.defaultCluster), this.filter.value);
    if (!groups.length) {
      this.clusters.append(h('p', { class: 'first-muted' }, this.filter.value
        ? `No model matches "${this.filter.value}".` : 'No cluster is configured.'));
    }
    for (const group of groups) {
      const section = h('div', { class: 'first-cluster', 'data-cluster': group.cluster },
        h('h3', {}, group.cluster));
      for (const error of group.errors) {
        section.append(h('div', { class: 'first-cluster-error', title: error }, firstLine(error)));
      }
      for (const download of group.downloads) {
        const bar = h('progress', { class: 'first-progress', max: '1',
          'aria-label': `Download for ${group.cluster}/${download.endpoint}` });
        if (download.fraction !== null) {
          (bar as HTMLProgressElement).value = download.fraction;
        }
        section.append(h('div', { class: 'first-download' }, bar, h('span', {}, download.label)));
      }
      for (const note of group.notes) {
        section.append(h('div', { class: 'first-muted', title: note }, firstLine(note)));
      }
      if (!group.models.length) {
        section.append(h('p', { class: 'first-muted' }, 'No model is listed here.'));
      }
      for (const model of group.models) {
        section.append(this.modelRow(model, group.cluster, status));
      }
      this.clusters.append(section);
    }
  }

  private modelRow(model: ClusterModel, cluster: string, status: StatusReply): HTMLElement {
    const key = `${cluster}\n${model.id}`;
    const open = this.expanded.has(key);
    const choose = (): void => void this.act(() => this.api.setDefaultModel(model.id));
    const radio = h('input', {
      type: 'radio', name: 'first-default-model', class: 'first-choose',
      title: `Use ${model.id} for %%first chat and the widgets`, 'aria-label': `Use ${model.id}`
    }) as HTMLInputElement;
    radio.checked = model.isDefault;
    radio.addEventListener('change', choose);
    const name = h('span', { class: 'first-model-name', title: `${model.id}: show details` }, model.id);
    const attrs: Record<string, string> = {
      class: `first-model${model.isDefault ? ' first-default' : ''}`, 'data-model': model.id,
      'data-state': model.state
    };
    if (model.maintenance) {
      attrs['data-maintenance'] = model.maintenance.clusters.join(' ');
    }
    const maintenance = model.maintenance && maintenanceBadge(model.maintenance);
    const row = h('div', attrs,
    radio, name,
    h('span', { class: `first-badge first-state-${model.state}`, title: STATE_HELP[model.state] }, model.state),
    maintenance && h('span', { class: 'first-badge first-maintenance', title: maintenance.help }, maintenance.label),
    model.isDefault && h('span', { class: 'first-default-mark', title: 'The default model' }, 'default'),
    canWarm(model.state, model.maintenance) && button('Warm up',
      `Start ${model.id} on ${cluster} now, ahead of the first request`,
      () => void this.act(() => this.api.warm(model.id, cluster)), 'first-warm'));
    name.addEventListener('click', () => {
      if (open) {
        this.expanded.delete(key);
      } else {
        this.expanded.add(key);
      }
      this.renderClusters();
    });
    if (!open) {
      return row;
    }
    const details = modelDetails(model, cluster, status, this.usage);
    const endpoints = details.endpoints.map(endpoint => h('li', {},
      `${endpoint.name}: ${endpoint.state}, expected first token ${formatMs(endpoint.ttftMs)}`,
      endpoint.error && h('div', { class: 'first-cluster-error', title: endpoint.error }, firstLine(endpoint.error))));
    const used = details.lastUsed ? new Date(details.lastUsed * 1000).toLocaleString() : 'never';
    return h('div', { class: 'first-model-box' }, row, h('div', { class: 'first-details' },
      ...firstFacts(details),
      h('ul', {}, ...endpoints),
      h('div', {}, `Last latency: ${formatMs(details.lastLatencyMs)}`),
      h('div', {}, `Tokens used: ${details.tokens.toLocaleString()} in ${details.requests} requests`),
      h('div', { class: 'first-muted' }, `Last used: ${used}`)));
  }

  private renderBatches(): void {
    this.batchList.replaceChildren();
    if (!this.batches.length) {
      this.batchList.append(h('p', { class: 'first-muted' },
        'No batch yet. Submit one with %first batch submit or first batch submit.'));
      return;
    }
    for (const batch of this.batches) {
      const view = batchView(batch);
      const bar = h('progress', { class: 'first-progress', max: '1', 'aria-label': `Progress of ${view.id}` });
      if (view.fraction !== null) {
        (bar as HTMLProgressElement).value = view.fraction;
      }
      this.batchList.append(h('div', { class: 'first-batch', 'data-batch': view.id, 'data-status': view.status },
        h('div', { class: 'first-batch-head' }, h('code', {}, view.id), h('span', {}, view.status),
          view.paused && h('span', { class: 'first-badge first-paused', title: 'Its lines wait while interactive '
            + 'requests use its model\'s endpoints; it speeds up again when they are done.' }, 'paused')),
        bar,
        h('div', { class: 'first-batch-foot' }, h('span', { class: 'first-batch-label' }, view.label),
          view.cancellable && button('Cancel', `Cancel ${view.id}: requests not yet sent are not run`,
            () => void this.act(() => this.api.cancelBatch(view.id)), 'first-cancel'))));
    }
  }
}
