// Validates rendered Kubernetes objects against npm kubernetes-models (the OpenAPI schemas of
// the Kubernetes API, compiled to validators): types, required fields, enums, formats.
//
//   node k8s_validate.mjs objects.json
//
// objects.json: [{source, object}]. Prints one line per problem ("<source> <Kind>/<name>:
// <path> <message>") and exits 1 if there is any; kinds kubernetes-models does not know are
// listed on stdout as "unknown-kind <source> <apiVersion> <Kind>/<name>" (the caller decides).
// kubernetes-models does not flag unknown keys; check_k8s.py adds a TypeScript pass for that.
import { readFileSync } from "node:fs";

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failures = 0;
for (const { source, object } of items) {
  const apiVersion = String(object.apiVersion ?? "");
  const kind = String(object.kind ?? "");
  const name = object.metadata?.name ?? "?";
  const where = `${source} ${kind}/${name}`;
  // "apps/v1" -> kubernetes-models/apps/v1, "v1" -> kubernetes-models/v1
  let mod;
  try {
    mod = await import(`kubernetes-models/${apiVersion}`);
  } catch {
    mod = undefined;
  }
  const Model = mod?.[kind];
  if (!Model) {
    console.log(`unknown-kind ${source} ${apiVersion} ${kind}/${name}`);
    continue;
  }
  try {
    new Model(object).validate();
  } catch (e) {
    failures++;
    const details = (e.errors ?? []).map((x) => `${x.instancePath || "/"} ${x.message}`);
    console.log(`${where}: ${details.length ? details.join("; ") : e.message}`);
  }
}
process.exit(failures ? 1 : 0);
