/**
 * A status as the gateway answers it with an existing FIRST gateway as cluster `alcf` (the shapes of
 * first_jupyter/gateway/backends/first_gateway.py): llama on sophia (under maintenance, its jobs unreadable) and
 * on polaris (up, its scheduler's numbers); qwen only on sophia; the embedder only on polaris; and a model of a
 * plain OpenAI-compatible cluster beside them.
 */
import type { StatusReply } from '../src/model';

export const LLAMA = 'meta-llama/Llama-3.3-70B-Instruct';
export const QWEN = 'Qwen/QwQ-32B';
export const EMBED = 'nvidia/NV-Embed-v2';

export function firstGateway(): StatusReply {
  return {
    default_model: LLAMA,
    clusters: ['alcf', 'lab'],
    models: [
      {
        id: LLAMA, state: 'hot', served_by: [{ cluster: 'alcf', endpoint: 'gateway', state: 'hot' }],
        details: {
          display_name: 'Llama 3.3 70B',
          description: 'Meta Llama 3.3, instruction-tuned.',
          capabilities: { api_protocols: ['chat_completions', 'responses'], streaming: true,
            tool_calling: { supported: true }, context_window_tokens: 131072, input_modalities: ['text'] },
          rate_limit_token_per_minute: 200000,
          rate_limit_token_per_minute_per_user: 50000
        }
      },
      { id: QWEN, state: 'cold', served_by: [{ cluster: 'alcf', endpoint: 'gateway', state: 'cold' }] },
      { id: EMBED, state: 'cold', served_by: [{ cluster: 'alcf', endpoint: 'gateway', state: 'cold' }] },
      { id: 'fake-model', state: 'hot', served_by: [{ cluster: 'lab', endpoint: 'vllm-1', state: 'hot' }] }
    ],
    endpoints: [
      {
        cluster: 'alcf', endpoint: 'gateway', kind: 'first', state: 'online',
        remote_clusters: {
          sophia: { models: [QWEN, LLAMA], jobs: 'The FIRST gateway (GET /resource_server/sophia/jobs) answered ' +
            '500: qstat failed on the login node\nmore lines', maintenance: true },
          polaris: { models: [LLAMA, EMBED], jobs: 'read', maintenance: false,
            scheduler: { free_nodes: 12, queued_jobs: 3, nodes: { gpu_free: 40 }, partitions: ['debug'] } }
        }
      },
      { cluster: 'lab', endpoint: 'vllm-1', kind: 'http', state: 'online' }
    ],
    auth: { signed_in: true, source: 'hub_api', identity: { sub: 'id-ada', preferred_username: 'ada@uni.edu' },
      tokens: {} }
  };
}
