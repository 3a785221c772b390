// Small DOM helpers. Data from the API (class names, model names) only ever becomes text:
// textContent and attribute values, never HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

export function el(tag, { className, text, attrs } = {}, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

export function svg(tag, attrs = {}, parent = null, text = undefined) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  if (parent) parent.append(node);
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

export const DASH = "\u2014";

// A number with `digits` significant digits, or a dash for null (undefined values, no traffic).
export function num(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(value)) return DASH;
  return Number(value.toPrecision(digits)).toString();
}

// mean ± std, the std to 2 significant digits; a std of exactly 0 (the same on every image) in words.
export function plusMinus(mean, std) {
  if (std === 0) return `${num(mean)}, constant`;
  if (std === null || std === undefined || !Number.isFinite(std)) return num(mean);
  return `${num(mean)} ± ${num(std, 2)}`;
}

export function ms(value) {
  return `${value.toFixed(value < 10 ? 2 : 1)} ms`;
}

export function percent(p) {
  return `${(p * 100).toFixed(p >= 0.999995 || p < 0.001 ? 2 : 1)} %`;
}
