// Z-Image for ComfyUI: frontend extension.
// Preset linkage on the sampler, a resolution picker on the empty latent, the offload plan on the model
// loader, and per-step timing with an ETA. Everything fails soft: without the server routes the nodes
// keep working and the status lines say what is missing.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAG = "[zimage]";
const FALLBACK = {
  presets: { turbo: { steps: 8, cfg: 1.0, shift: 3.0 }, base: { steps: 28, cfg: 4.0, shift: 3.0 } },
  resolutions: {},
  min_side: 512,
  max_side: 2048,
};
let INFO = FALLBACK;

async function loadInfo() {
  try {
    const r = await api.fetchApi("/zimage/info");
    if (r.ok) INFO = { ...FALLBACK, ...(await r.json()) };
  } catch (e) {
    console.warn(TAG, "server info route unavailable; using built-in presets", e);
  }
}

const widget = (node, name) => node.widgets?.find((w) => w.name === name);

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

/** A read-only status line under the node's widgets (not saved in the workflow). */
function statusLine(node, name, lines = 2) {
  const el = document.createElement("div");
  el.className = `zimage-status zimage-${name}`;
  el.dataset.zimage = name;
  el.style.cssText =
    "font: 11px/1.35 sans-serif; color: var(--descrip-text, #aaa); padding: 2px 8px; white-space: pre-wrap; overflow: hidden;";
  const height = 8 + 15 * lines;
  el.style.minHeight = `${height}px`;
  const w = node.addDOMWidget(`zimage_${name}`, "zimage_status", el, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height,
    getHeight: () => height,
  });
  w.serialize = false;
  if (w.options) w.options.serialize = false;
  w.computeSize = () => [node.size?.[0] ?? 200, height];
  return el;
}

function setStatus(el, text, warn = false) {
  if (!el) return;
  el.textContent = text;
  el.style.color = warn ? "var(--error-text, #f77)" : "var(--descrip-text, #aaa)";
}

/** Wrap a widget's callback; ``after`` runs after the original one. */
function onChange(w, after) {
  if (!w) return;
  const orig = w.callback;
  w.callback = function (v, ...rest) {
    const r = orig?.call(this, v, ...rest);
    try {
      after(w.value);
    } catch (e) {
      console.error(TAG, e);
    }
    return r;
  };
}

// ---- sampler: presets and step timing -------------------------------------------------------------

function linkPresets(node) {
  const preset = widget(node, "preset");
  const fields = ["steps", "cfg", "shift"].map((n) => widget(node, n));
  if (!preset || fields.some((w) => !w)) return;
  let applying = false;
  onChange(preset, (name) => {
    const p = INFO.presets[name];
    if (!p) return;
    applying = true;
    for (const w of fields) w.value = p[w.name];
    applying = false;
    redraw(node);
  });
  for (const w of fields) {
    onChange(w, () => {
      if (applying) return;
      const p = INFO.presets[preset.value];
      if (p && Math.abs(p[w.name] - w.value) > 1e-9) {
        preset.value = "custom";
        redraw(node);
      }
    });
  }
  node.zimageTiming = statusLine(node, "timing", 1);
  setStatus(node.zimageTiming, "idle");
}

function onProgress(e) {
  const d = e.detail || {};
  const node = app.graph?.getNodeById?.(Number(d.node)) ?? app.graph?.getNodeById?.(d.node);
  if (!node?.zimageTiming) return;
  const eta = d.eta_seconds > 0 ? ` · ETA ${d.eta_seconds.toFixed(1)} s` : " · done";
  setStatus(node.zimageTiming, `step ${d.step}/${d.total} · ${d.seconds_per_step.toFixed(2)} s/step${eta}`);
  node.zimageSteps = (node.zimageSteps || 0) + 1;
}

// ---- empty latent: resolution picker ----------------------------------------------------------------

function describeSize(w, h) {
  const mp = (w * h) / 1e6;
  const text = `${w}×${h} · ${mp.toFixed(2)} MP`;
  if (Math.min(w, h) < INFO.min_side || Math.max(w, h) > INFO.max_side)
    return [`${text}\n⚠ outside ${INFO.min_side}–${INFO.max_side} px per side (Z-Image's training range)`, true];
  return [text, false];
}

function linkResolution(node) {
  const res = widget(node, "resolution");
  const ww = widget(node, "width");
  const hw = widget(node, "height");
  if (!res || !ww || !hw) return;
  const status = statusLine(node, "size", 3);
  let applying = false;
  const update = () => {
    setStatus(status, ...describeSize(ww.value, hw.value));
    refreshPlans();
  };
  onChange(res, (name) => {
    const wh = INFO.resolutions[name] ?? parsePreset(name);
    if (wh) {
      applying = true;
      ww.value = wh[0];
      hw.value = wh[1];
      applying = false;
    }
    update();
    redraw(node);
  });
  for (const w of [ww, hw]) {
    onChange(w, (v) => {
      const snapped = Math.max(16, Math.round(v / 16) * 16);
      if (snapped !== v) w.value = snapped;
      if (!applying) {
        const wh = INFO.resolutions[res.value] ?? parsePreset(res.value);
        if (wh && (wh[0] !== ww.value || wh[1] !== hw.value)) res.value = "custom";
      }
      update();
      redraw(node);
    });
  }
  update();
}

function parsePreset(name) {
  const m = /\((\d+)×(\d+)\)/.exec(name || "");
  return m ? [Number(m[1]), Number(m[2])] : null;
}

// ---- model loader: the offload plan ----------------------------------------------------------------

function linkPlan(node) {
  const names = ["model_name", "weight_dtype", "offload", "vram_budget_gb"];
  const ws = names.map((n) => widget(node, n));
  if (ws.some((w) => !w)) return;
  const status = statusLine(node, "plan", 4);
  node.zimagePlan = status;
  let timer = null;
  let seq = 0;
  const refresh = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const mine = ++seq;
      setStatus(status, "plan: computing…");
      try {
        const body = Object.fromEntries(ws.map((w) => [w.name, w.value]));
        Object.assign(body, graphSize());
        const r = await api.fetchApi("/zimage/plan", { method: "POST", body: JSON.stringify(body) });
        if (mine !== seq) return;
        if (!r.ok) return setStatus(status, "plan: unavailable (server route missing)");
        const d = await r.json();
        if (!d.ok) return setStatus(status, `plan: ${d.error}`, true);
        const notes = d.notes?.length ? `\n${d.notes.join("; ")}` : "";
        setStatus(status, `plan (${d.model_size} model): ${d.text}${notes}`);
      } catch (e) {
        if (mine === seq) setStatus(status, "plan: unavailable");
      }
    }, 250);
  };
  for (const w of ws) onChange(w, refresh);
  node.zimageRefreshPlan = refresh;
  refresh();
}

/** The size the graph generates at (its first Z-Image Empty Latent), for the plan's activation estimate. */
function graphSize() {
  const lat = (app.graph?._nodes ?? []).find((n) => n.comfyClass === "ZImageEmptyLatent");
  const w = widget(lat ?? {}, "width")?.value;
  const h = widget(lat ?? {}, "height")?.value;
  return w && h ? { width: w, height: h } : { width: 1024, height: 1024 };
}

function refreshPlans() {
  for (const n of app.graph?._nodes ?? []) n.zimageRefreshPlan?.();
}

function onPlan(e) {
  const d = e.detail || {};
  if (!d.model) return;
  for (const node of app.graph?._nodes ?? []) {
    if (node.comfyClass !== "ZImageModelLoader" || !node.zimagePlan) continue;
    const name = String(widget(node, "model_name")?.value ?? "").replace(/\/$/, "");
    if (name.split("/").pop() !== d.model) continue;
    const text = d.plan ? d.plan.text : `loaded on ${d.device}: weights in system memory`;
    const notes = d.plan?.notes?.length ? `\n${d.plan.notes.join("; ")}` : "";
    setStatus(node.zimagePlan, `confirmed after load: ${text}${notes}`, Boolean(notes));
  }
}

// ---- registration -----------------------------------------------------------------------------

app.registerExtension({
  name: "zimage.nodes",
  async setup() {
    await loadInfo();
    api.addEventListener("zimage.progress", onProgress);
    api.addEventListener("zimage.plan", onPlan);
  },
  nodeCreated(node) {
    // synchronous, so the links exist before a loading workflow restores values; INFO is read at event time
    const cls = node.comfyClass;
    if (!cls?.startsWith("ZImage")) return;
    try {
      if (cls === "ZImageSampler") linkPresets(node);
      else if (cls === "ZImageEmptyLatent") linkResolution(node);
      else if (cls === "ZImageModelLoader") linkPlan(node);
    } catch (e) {
      console.error(TAG, `could not enhance ${cls}`, e);
    }
  },
  loadedGraphNode(node) {
    // values restored from a workflow: refresh the derived lines
    if (node.comfyClass === "ZImageModelLoader") node.zimageRefreshPlan?.();
    if (node.comfyClass === "ZImageEmptyLatent") widget(node, "width")?.callback?.(widget(node, "width").value);
  },
});
