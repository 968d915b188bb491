"""The web extension in the real ComfyUI frontend, driven by headless Chromium (Playwright, system browser).

Screenshots go to test-artifacts/browser/. Skips with a message when Chromium, Playwright or ComfyUI is missing.
"""

import json
import os
import shutil
import time

import pytest
from comfy_harness import ROOT, WORKFLOWS, comfyui_path

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]

if comfyui_path() is None:
    pytest.skip("no ComfyUI found (set COMFYUI_PATH or put one in ~/ComfyUI): browser tests skipped", allow_module_level=True)
if CHROMIUM is None:
    pytest.skip("no Chromium found (Debian package 'chromium'): browser tests skipped", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright (Python package) is not installed: browser tests skipped", allow_module_level=True)


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory):
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
                                                    headless=True, args=FLAGS, viewport={"width": 1600, "height": 1000})
        pg = ctx.new_page()
        pg.zimage_console = []
        pg.on("console", lambda m: pg.zimage_console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        pg.on("pageerror", lambda e: pg.zimage_console.append(("pageerror", str(e), "")))
        pg.goto(comfy_server.url, wait_until="domcontentloaded")
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && window.comfyAPI", timeout=120_000)
        pg.wait_for_function("() => window.app.extensionManager && window.app.extensions?.some?.(e => e.name === 'zimage.nodes')"
                             " || (window.app.extensions || []).some(e => e.name === 'zimage.nodes')", timeout=60_000)
        pg.keyboard.press("Escape")
        version = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || window.comfyAPI?.app?.app?.ui?.settings?.version || null")
        print(f"frontend version: {version or frontend_version()}")
        yield pg
        ctx.close()


def frontend_version() -> str:
    import glob

    for meta in glob.glob(os.path.expanduser("~/.cache/zimage-comfyui-venv/*/lib/python*/site-packages/comfyui_frontend_package-*.dist-info")):
        return os.path.basename(meta).split("-")[1]
    return "unknown"


def load(page, name):
    wf = json.load(open(os.path.join(WORKFLOWS, name), encoding="utf-8"))
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [wf, name])
    page.wait_for_timeout(500)
    page.keyboard.press("Escape")
    return wf


def node_js(cls):
    return f"window.app.graph._nodes.find(n => n.comfyClass === '{cls}')"


def our_errors(page):
    return [m for m in page.zimage_console if m[0] in ("error", "pageerror") and ("zimage" in m[1].lower() or "ComfyUI-ZImage" in m[2])]


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(WORKFLOWS) if f.endswith(".json")))
def test_every_workflow_loads_without_missing_nodes(page, name):
    wf = load(page, name)
    missing = page.evaluate("() => window.app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert missing == []
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type).sort()")
    assert types == sorted(n["type"] for n in wf["nodes"])
    page.screenshot(path=os.path.join(ARTIFACTS, name.replace(".json", ".png")))
    assert our_errors(page) == []


def test_help_docs_are_served(comfy_server):
    import urllib.request

    for node in ("ZImageSampler", "ZImageModelLoader", "ZImageEditEncode"):
        with urllib.request.urlopen(f"{comfy_server.url}/extensions/ComfyUI-ZImage/docs/{node}.md") as r:
            assert r.status == 200 and b"#" in r.read()
    text = urllib.request.urlopen(f"{comfy_server.url}/extensions/ComfyUI-ZImage/docs/ZImageSampler.md").read().decode()
    assert "turbo" in text and "base" in text


def test_preset_linkage(page):
    load(page, "z_image_turbo_text_to_image.json")
    read = f"() => {{ const n = {node_js('ZImageSampler')}; return Object.fromEntries(n.widgets.filter(w => w.name).map(w => [w.name, w.value])); }}"
    page.evaluate(f"() => {{ const w = {node_js('ZImageSampler')}.widgets.find(w => w.name === 'preset'); w.value = 'base'; w.callback('base'); }}")
    v = page.evaluate(read)
    assert (v["preset"], v["steps"], v["cfg"], v["shift"]) == ("base", 28, 4.0, 3.0)
    page.evaluate(f"() => {{ const w = {node_js('ZImageSampler')}.widgets.find(w => w.name === 'steps'); w.value = 40; w.callback(40); }}")
    v = page.evaluate(read)
    assert (v["preset"], v["steps"]) == ("custom", 40)
    page.evaluate(f"() => {{ const w = {node_js('ZImageSampler')}.widgets.find(w => w.name === 'preset'); w.value = 'turbo'; w.callback('turbo'); }}")
    v = page.evaluate(read)
    assert (v["preset"], v["steps"], v["cfg"], v["shift"]) == ("turbo", 8, 1.0, 3.0)
    page.screenshot(path=os.path.join(ARTIFACTS, "preset_linkage.png"))


def test_resolution_picker(page):
    load(page, "z_image_turbo_text_to_image.json")
    n = node_js("ZImageEmptyLatent")

    def set_(name, value):
        page.evaluate(f"([v]) => {{ const w = {n}.widgets.find(w => w.name === '{name}'); w.value = v; w.callback(v); }}", [value])
        return page.evaluate(f"() => [{n}.widgets.find(w => w.name === 'width').value, {n}.widgets.find(w => w.name === 'height').value,"
                             f" {n}.widgets.find(w => w.name === 'resolution').value, document.querySelectorAll('.zimage-size').length ?"
                             f" {n}.widgets.find(w => w.name === 'zimage_size').element.textContent : '']")
    w, h, res, text = set_("resolution", "16:9 (1344×768)")
    assert (w, h, res) == (1344, 768, "16:9 (1344×768)") and "1.03 MP" in text and "⚠" not in text
    w, h, res, text = set_("width", 1000)
    assert (w, res) == (1008, "custom") and "1008×768" in text  # snapped to a multiple of 16
    w, h, res, text = set_("height", 250)
    assert h == 256 and "⚠" in text and "512–2048" in text  # outside the trained range: visible warning
    page.screenshot(path=os.path.join(ARTIFACTS, "resolution_picker.png"))


def test_plan_text_and_a_run_with_step_messages(page):
    load(page, "z_image_turbo_text_to_image.json")
    m, s, lat = node_js("ZImageModelLoader"), node_js("ZImageSampler"), node_js("ZImageEmptyLatent")
    plan = f"() => {m}.widgets.find(w => w.name === 'zimage_plan').element.textContent"
    page.wait_for_function(f"() => ({plan})().includes('resident (')", timeout=30_000)
    page.evaluate(f"() => {{ for (const [k, v] of [['resolution', 'custom'], ['width', 2048], ['height', 2048]]) {{"
                  f" const w = {lat}.widgets.find(w => w.name === k); w.value = v; w.callback(v); }} }}")  # plan for 2048² activations
    texts = []
    for budget in (8.0, 0.1):  # roomy, then far too small: the plan is recomputed from the file header
        page.evaluate(f"() => {{ for (const [k, v] of [['offload', 'budget'], ['vram_budget_gb', {budget}]]) {{"
                      f" const w = {m}.widgets.find(w => w.name === k); w.value = v; w.callback(v); }} }}")
        want = "(0 blocks) · peak" if budget > 1 else "below the minimum"
        try:
            page.wait_for_function(f"() => ({plan})().includes('{want}')", timeout=30_000)
        except Exception:
            vals = page.evaluate(f"() => {m}.widgets.map(w => [w.name, w.value])")
            raise AssertionError(f"plan text after budget {budget}: {page.evaluate(plan)!r}; widgets {vals}") from None
        texts.append(page.evaluate(plan))
    assert "resident (4 blocks)" in texts[0] and "resident (0 blocks)" in texts[1] and "streamed per step (4 blocks)" in texts[1]
    page.screenshot(path=os.path.join(ARTIFACTS, "offload_plan.png"))
    page.evaluate(f"() => {{ for (const [k, v] of [['resolution', 'custom'], ['width', 256], ['height', 256]]) {{"
                  f" const w = {lat}.widgets.find(w => w.name === k); w.value = v; w.callback(v); }} }}")
    page.evaluate(f"() => {{ {s}.zimageSteps = 0; }}")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function(f"() => {s}.zimageSteps >= 8", timeout=120_000)
    timing = page.evaluate(f"() => {s}.widgets.find(w => w.name === 'zimage_timing').element.textContent")
    assert "step 8/8" in timing and "s/step" in timing
    page.wait_for_function(f"() => ({plan})().includes('confirmed after load')", timeout=30_000)
    page.screenshot(path=os.path.join(ARTIFACTS, "run_finished.png"))
    assert our_errors(page) == []


def test_extension_fails_soft_without_routes(page):
    """With the plan route answering 404, the loader says so and the graph still runs."""
    page.route("**/zimage/plan", lambda route: route.fulfill(status=404, body="not found"))
    try:
        load(page, "z_image_turbo_text_to_image.json")
        m = node_js("ZImageModelLoader")
        page.wait_for_function(f"() => {m}.widgets.find(w => w.name === 'zimage_plan').element.textContent.includes('unavailable')",
                               timeout=30_000)
    finally:
        page.unroute("**/zimage/plan")
    assert time.time() > 0 and our_errors(page) == []
