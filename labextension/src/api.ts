/**
 * The gateway's routes on the Jupyter server, called through `ServerConnection.makeRequest` so that the
 * browser's Jupyter session (cookie, XSRF token, base URL of a JupyterHub user server) is used as is.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { describeFailure } from './model';
import type { BatchPage, BatchReply, SignIn, StatusReply, UsageRow, UsageSummary } from './model';

/** A call that failed, with its message already in plain words for the panel. */
export class GatewayCallError extends Error {}

export class GatewayApi {
  constructor(private readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  async call<T>(what: string, path: string, init: RequestInit = {}): Promise<T> {
    const url = URLExt.join(this.settings.baseUrl, 'first', path);
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.settings);
    } catch {
      throw new GatewayCallError(describeFailure(what, null, ''));
    }
    const text = await response.text();
    if (!response.ok) {
      throw new GatewayCallError(describeFailure(what, response.status, text));
    }
    return (text ? JSON.parse(text) : {}) as T;
  }

  status(): Promise<StatusReply> {
    return this.call('read the clusters\' state', 'api/status');
  }

  async usage(): Promise<UsageRow[]> {
    return (await this.call<UsageSummary>('read the usage', 'api/usage')).data;
  }

  async batches(limit: number): Promise<BatchReply[]> {
    return (await this.call<BatchPage>('list the batches', `v1/batches?limit=${limit}`)).data;
  }

  async setDefaultModel(model: string): Promise<string> {
    const body = JSON.stringify({ model });
    const reply = await this.call<{ default_model: string }>(`make ${model} the default`, 'api/default_model',
      { method: 'PUT', body });
    return reply.default_model;
  }

  warm(model: string, cluster: string | null): Promise<Record<string, unknown>> {
    const body = JSON.stringify(cluster ? { cluster } : {});
    return this.call(`warm up ${model}`, `api/models/${encodeURIComponent(model)}/warm`, { method: 'POST', body });
  }

  cancelBatch(id: string): Promise<BatchReply> {
    return this.call(`cancel batch ${id}`, `v1/batches/${encodeURIComponent(id)}/cancel`, { method: 'POST' });
  }

  async loginStart(): Promise<string> {
    return (await this.call<{ url: string }>('start the Globus sign-in', 'api/login', { method: 'POST' })).url;
  }

  loginFinish(code: string): Promise<SignIn> {
    return this.call('finish the Globus sign-in', 'api/login/code',
      { method: 'POST', body: JSON.stringify({ code }) });
  }

  logout(): Promise<SignIn> {
    return this.call('sign out', 'api/logout', { method: 'POST' });
  }
}
