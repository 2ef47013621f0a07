// Validates Kubernetes objects against the API's OpenAPI schemas (the kubernetes-models package's
// compiled validators), and also refuses fields the schema does not know, as an API server with
// strict field validation (kubectl's default) does.
//
// Usage: node validate.mjs OBJECTS.json   (a JSON array of objects, e.g. from `kubectl kustomize`)
// Prints one line per object; exits 1 if any object is invalid. NODE_PATH or a node_modules beside
// this file must hold kubernetes-models (tools/setup.sh installs it from package-lock.json).
import { readFileSync } from "node:fs";

const groups = { "": "Core", apps: "Apps", policy: "Policy", batch: "Batch", autoscaling: "Autoscaling",
  "networking.k8s.io": "Networking", "rbac.authorization.k8s.io": "Rbac" };

// Wraps `value` so that every property the validator reads is recorded. An object whose keys the
// validator enumerates (a map, such as labels) accepts any key.
function track(value, seen) {
  if (value === null || typeof value !== "object") return value;
  const rec = { read: new Set(), enumerated: false };
  seen.set(value, rec);
  const children = new Map();
  return new Proxy(value, {
    get(target, key, receiver) {
      if (typeof key === "string") rec.read.add(key);
      const v = Reflect.get(target, key, receiver);
      if (v === null || typeof v !== "object") return v;
      if (!children.has(key)) children.set(key, track(v, seen));
      return children.get(key);
    },
    has(target, key) {
      if (typeof key === "string") rec.read.add(key);
      return Reflect.has(target, key);
    },
    ownKeys(target) {
      rec.enumerated = true;
      return Reflect.ownKeys(target);
    },
  });
}

function unknownFields(value, seen, path, out) {
  if (value === null || typeof value !== "object") return;
  const rec = seen.get(value);
  if (rec === undefined) return;  // never reached: inside a field the schema leaves free
  for (const key of Object.keys(value)) {
    if (!Array.isArray(value) && !rec.enumerated && !rec.read.has(key)) out.push(`${path}/${key}`);
    unknownFields(value[key], seen, `${path}/${key}`, out);
  }
}

const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
let bad = 0;
for (const obj of objects) {
  const [group, version] = obj.apiVersion.includes("/") ? obj.apiVersion.split("/") : ["", obj.apiVersion];
  const name = `${obj.kind}/${obj.metadata?.name}`;
  const g = groups[group];
  if (g === undefined) {
    console.log(`${name}: unknown API group ${group}`);
    bad++;
    continue;
  }
  const schema = `IoK8sApi${g}${version[0].toUpperCase()}${version.slice(1)}${obj.kind}`;
  let validate;
  try {
    ({ validate } = await import(`kubernetes-models/_schemas/${schema}`));
  } catch (e) {
    console.log(`${name}: no schema ${schema} for ${obj.apiVersion} ${obj.kind}`);
    bad++;
    continue;
  }
  const seen = new Map();
  const ok = validate(track(obj, seen));
  const errors = (validate.errors ?? []).map((e) => `${e.instancePath || "/"} ${e.message ?? e.keyword} ${JSON.stringify(e.params)}`);
  const unknown = [];
  unknownFields(obj, seen, "", unknown);
  for (const u of unknown) errors.push(`${u}: unknown field`);
  if (ok && unknown.length === 0) {
    console.log(`${name}: valid`);
  } else {
    console.log(`${name}: INVALID\n  ${errors.join("\n  ")}`);
    bad++;
  }
}
process.exit(bad ? 1 : 0);
