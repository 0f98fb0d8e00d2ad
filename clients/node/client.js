// A small Node.js client for SuperWeightService. The contract is loaded at run time from the repository's
// proto/ (no generated code): @grpc/proto-loader parses it, @grpc/grpc-js makes the calls.
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

export const PROTO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "proto", "superweights", "v1",
  "superweights.proto");

// Field names as in the .proto (max_tokens, token_ids); int64 as strings; unset scalars as their zero value.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

/** The SuperWeightService client constructor, from the .proto at `protoPath`. */
export function loadService(protoPath = PROTO) {
  const definition = protoLoader.loadSync(protoPath, LOADER_OPTIONS);
  return grpc.loadPackageDefinition(definition).superweights.v1.SuperWeightService;
}

/** A prompt field of GenerateRequest / CompareGenerationsRequest: text, or an array of token ids. */
function prompt(value) {
  return Array.isArray(value) ? { token_ids: { ids: value } } : { text: value };
}

export class SuperWeightClient {
  /**
   * @param {string} target "host:port"
   * @param {object} options token: bearer token when the server has auth on; rootCert: PEM (Buffer) of the CA
   *   that signed the server's certificate (TLS); clientCert, clientKey: PEM (Buffers) of this client's
   *   certificate and key, for a server that requires one (mutual TLS); timeoutSeconds: deadline of every call;
   *   protoPath.
   */
  constructor(target, { token = "", rootCert = null, clientCert = null, clientKey = null, timeoutSeconds = 300,
    protoPath = PROTO } = {}) {
    const Service = loadService(protoPath);
    const credentials = rootCert ? grpc.credentials.createSsl(rootCert, clientKey, clientCert)
      : grpc.credentials.createInsecure();
    this.stub = new Service(target, credentials);
    // Per-call metadata rather than call credentials: grpc-js sends call credentials over TLS only, and the
    // server accepts a token on a plaintext loopback port too.
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set("authorization", `Bearer ${token}`);
    this.timeoutSeconds = timeoutSeconds;
  }

  #options() {
    return { deadline: new Date(Date.now() + this.timeoutSeconds * 1000) };
  }

  #unary(method, request) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, this.#options(), (error, response) =>
        error ? reject(error) : resolve(response));
    });
  }

  /** Stream a generation: an async iterable of GenerateResponse messages (text deltas; the last has counts). */
  generateStream(text, { variant = "", chat = false, sampling = {} } = {}) {
    return this.stub.Generate({ ...prompt(text), sampling, variant, chat }, this.metadata, this.#options());
  }

  /** The whole generation: text, token ids, finish reason, token counts and how many messages streamed. */
  async generate(text, options = {}) {
    const result = { text: "", token_ids: [], messages: 0 };
    for await (const message of this.generateStream(text, options)) {
      result.text += message.text;
      result.token_ids.push(...message.token_ids);
      result.messages += 1;
      Object.assign(result, { finish_reason: message.finish_reason, prompt_tokens: message.prompt_tokens,
        completion_tokens: message.completion_tokens });
    }
    return result;
  }

  /** The served SuperWeightReport (unwrapped from GetSuperWeightsResponse). */
  async superWeights() {
    return (await this.#unary("GetSuperWeights", {})).report;
  }

  /** GetModelInfoResponse: model, dtype, engine, device, variants, limits. */
  modelInfo() {
    return this.#unary("GetModelInfo", {});
  }

  /** CompareGenerationsResponse: `arms` (one per variant, then per alpha) and each later arm's `divergence`. */
  compare(text, { variants = [], alphas = [], chat = false, sampling = {} } = {}) {
    return this.#unary("CompareGenerations", { ...prompt(text), sampling, variants, alphas, chat });
  }

  close() {
    this.stub.close();
  }
}
