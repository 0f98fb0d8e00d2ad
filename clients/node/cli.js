#!/usr/bin/env node
// superweights-node: stream a generation, read the super weights, run a compare, from Node.js.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { status } from "@grpc/grpc-js";

import { SuperWeightClient } from "./client.js";

const USAGE = `usage: node cli.js [--target HOST:PORT] [--token T] [--tls-ca CA.pem [--tls-cert C.pem --tls-key C.key]]
                   [--timeout S] [--json] COMMAND
  generate PROMPT [--variant V] [--chat] [sampling]   stream a generation (text to stdout as it arrives)
  super-weights                                        the served super weights
  info                                                 the served model and its variants
  compare PROMPT [--variant V]... [--alpha A]... [--chat] [sampling]
                                                       one prompt through several arms, side by side
sampling: --max-tokens N (64) --temperature T (0: greedy) --top-p P --top-k K --seed S
The token may also come from $SUPERWEIGHTS_TOKEN. --tls-cert/--tls-key: this client's certificate and key, for a
server that requires one (mutual TLS). --json prints one JSON document instead of text.`;

const OPTIONS = {
  target: { type: "string", default: "127.0.0.1:50051" },
  token: { type: "string", default: process.env.SUPERWEIGHTS_TOKEN ?? "" },
  "tls-ca": { type: "string" },
  "tls-cert": { type: "string" },
  "tls-key": { type: "string" },
  timeout: { type: "string", default: "300" },
  json: { type: "boolean", default: false },
  variant: { type: "string", multiple: true, default: [] },
  alpha: { type: "string", multiple: true, default: [] },
  chat: { type: "boolean", default: false },
  "max-tokens": { type: "string", default: "64" },
  temperature: { type: "string", default: "0" },
  "top-p": { type: "string" },
  "top-k": { type: "string", default: "0" },
  seed: { type: "string" },
  help: { type: "boolean", short: "h", default: false },
};

function sampling(values) {
  const params = { max_tokens: Number(values["max-tokens"]), temperature: Number(values.temperature),
    top_k: Number(values["top-k"]) };
  if (values["top-p"] !== undefined) params.top_p = Number(values["top-p"]);
  if (values.seed !== undefined) params.seed = values.seed;  // int64: a decimal string
  return params;
}

async function generate(client, text, values) {
  const options = { variant: values.variant[0] ?? "", chat: values.chat, sampling: sampling(values) };
  if (values.json) {
    console.log(JSON.stringify(await client.generate(text, options)));
    return;
  }
  let last = null;
  for await (const message of client.generateStream(text, options)) {
    process.stdout.write(message.text);
    last = message;
  }
  process.stdout.write("\n");
  console.error(`[${last.finish_reason}: ${last.prompt_tokens} prompt + ${last.completion_tokens} generated tokens]`);
}

async function superWeights(client, values) {
  const report = await client.superWeights();
  if (values.json) {
    console.log(JSON.stringify(report));
    return;
  }
  console.log(`${report.model_name} (${report.architecture}), sha256 ${report.model_sha256.slice(0, 12)}`);
  for (const w of report.super_weights) {
    const served = w.engine_value === undefined ? "" : `  engine ${w.engine_value.toFixed(6)}`;
    console.log(`layer ${w.layer}  row ${w.row}  col ${w.col}  value ${w.value.toFixed(6)}${served}  ` +
      `${w.module}.weight[${w.row}, ${w.col}]`);
  }
  console.log(`perplexity ${report.baseline_perplexity.toFixed(2)} -> ${report.removed_perplexity.toFixed(2)} ` +
    `without them (${report.eval_tokens} tokens of ${report.eval_text})`);
}

async function info(client, values) {
  const model = await client.modelInfo();
  if (values.json) {
    console.log(JSON.stringify(model));
    return;
  }
  for (const [key, value] of Object.entries(model)) console.log(`${key}: ${value}`);
}

async function compare(client, text, values) {
  const response = await client.compare(text, { variants: values.variant, alphas: values.alpha.map(Number),
    chat: values.chat, sampling: sampling(values) });
  if (values.json) {
    console.log(JSON.stringify(response));
    return;
  }
  const divergence = new Map(response.divergence.map((d) => [d.variant, d]));
  for (const arm of response.arms) {
    const d = divergence.get(arm.variant);
    const vs = d ? `  first diff ${d.first_differing_token}, top-1 agreement ${d.top1_agreement.toFixed(2)}, ` +
      `KL top-k ${d.mean_kl_topk.toFixed(3)}` : "";
    console.log(`${arm.variant}: ${JSON.stringify(arm.text)}  stop-word mass ${arm.stop_word_mass.toFixed(3)}${vs}`);
  }
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs({ options: OPTIONS, allowPositionals: true });
  } catch (error) {
    console.error(`${error.message}\n${USAGE}`);
    return 2;
  }
  const { values, positionals: [command, text] } = parsed;
  const needsPrompt = command === "generate" || command === "compare";
  if (values.help || !["generate", "super-weights", "info", "compare"].includes(command) || (needsPrompt && !text)) {
    (values.help ? console.log : console.error)(USAGE);
    return values.help ? 0 : 2;
  }
  if (Boolean(values["tls-cert"]) !== Boolean(values["tls-key"]) || (values["tls-cert"] && !values["tls-ca"])) {
    console.error(`--tls-cert and --tls-key go together, and with --tls-ca\n${USAGE}`);
    return 2;
  }
  const pem = (option) => (values[option] ? readFileSync(values[option]) : null);
  const client = new SuperWeightClient(values.target, { token: values.token, timeoutSeconds: Number(values.timeout),
    rootCert: pem("tls-ca"), clientCert: pem("tls-cert"), clientKey: pem("tls-key") });
  try {
    if (command === "generate") await generate(client, text, values);
    else if (command === "super-weights") await superWeights(client, values);
    else if (command === "info") await info(client, values);
    else await compare(client, text, values);
    return 0;
  } catch (error) {
    if (error.code === undefined) throw error;
    console.error(`error: ${status[error.code]}: ${error.details}`);
    return 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main();
