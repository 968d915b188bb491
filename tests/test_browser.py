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
def pw():
    """One Playwright per module: its sync API runs an event loop, so a second one could not start beside it."""
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def page(pw, comfy_server, tmp_path_factory):
    os.makedirs(ARTIFACTS, exist_ok=True)
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


@pytest.fixture(scope="module")
def empty_comfy(tmp_path_factory):
    """A second ComfyUI whose models folder is empty: what a new user has when opening a template."""
    from comfy_harness import ComfyServer, comfyui_python

    base = str(tmp_path_factory.mktemp("comfy_empty"))
    os.makedirs(os.path.join(base, "models"))
    srv = ComfyServer(comfyui_path(), comfyui_python(comfyui_path()), base)
    yield srv
    srv.stop()


def test_missing_models_offer_the_template_downloads(pw, empty_comfy, tmp_path):
    """A template opened in a ComfyUI without the files: the frontend's error panel lists them as missing models, each
    with a Download button that opens the link the template carries (properties.models). huggingface.co is not
    reached: the requests the buttons make are recorded and refused."""
    wf = json.load(open(os.path.join(WORKFLOWS, "z_image_turbo_text_to_image.json"), encoding="utf-8"))
    want = sorted(m["url"] for n in wf["nodes"] for m in n["properties"].get("models", []))
    opened = []

    def hub(route):
        if route.request.method == "GET":
            opened.append(route.request.url)
        route.abort()

    ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                                                args=FLAGS, viewport={"width": 1600, "height": 1000})
    ctx.route("https://huggingface.co/**", hub)
    pg = ctx.new_page()
    pg.goto(empty_comfy.url, wait_until="domcontentloaded")
    pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    pg.keyboard.press("Escape")
    pg.evaluate("async ([wf]) => { await window.app.loadGraphData(wf, true, true, 'z_image_turbo_text_to_image'); }", [wf])
    see = pg.locator('[data-testid="error-overlay-see-errors"]')  # "3 errors found" → View details
    see.wait_for(timeout=60_000)
    for _ in range(20):  # a fresh profile may open a welcome/templates dialog over it
        if not pg.locator('[data-testid="dialog-overlay"]').is_visible():
            break
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(500)
    see.click()
    buttons = pg.locator('[data-testid="missing-model-download"]')
    buttons.first.wait_for(timeout=60_000)
    pg.screenshot(path=os.path.join(ARTIFACTS, "missing_models.png"))
    labels = sorted(buttons.nth(i).get_attribute("aria-label") for i in range(buttons.count()))
    for i in range(buttons.count()):
        buttons.nth(i).click()
    t0 = time.time()
    while len(opened) < len(want) and time.time() - t0 < 30:
        pg.wait_for_timeout(200)
    ctx.close()
    assert len(labels) == 3 and all(any(n in lab for lab in labels) for n in
                                    ("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors")), labels
    assert sorted(set(opened)) == want
