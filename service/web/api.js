// The service's REST API, same origin (paths relative to the page, so a root path prefix works).
// Errors are the API's {"error": {"code", "message"}}; ApiError keeps them as they are.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  toString() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
}

async function call(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { Accept: "application/json" } });
  } catch (error) {
    throw new ApiError(0, "network_error", `the service could not be reached (${error.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error;
    if (error && typeof error.message === "string") {
      throw new ApiError(response.status, error.code || "error", error.message);
    }
    throw new ApiError(response.status, "http_error", `HTTP ${response.status} ${response.statusText}`);
  }
  return body;
}

function query(params) {
  const defined = Object.entries(params).filter(([, value]) => value !== null && value !== undefined && value !== "");
  return new URLSearchParams(defined).toString();
}

export function listModels() {
  return call("models");
}

export function predict(image, filename, { model, version, topK }) {
  const form = new FormData();
  form.append("file", image, filename);
  return call(`predict?${query({ model, version, top_k: topK })}`, { method: "POST", body: form });
}

export function stiffness({ model, version }) {
  return call(`stiffness?${query({ model, version })}`);
}
