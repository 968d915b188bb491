"""Seed variety: seeded noise on the prompt for the first part of the schedule (zimage_core/variety.py).

Measured on the tiny random model below (Turbo schedule, 8 steps, 64×64; CPU, main at 81b997b): mean pairwise
distance of final latents over 8 seeds 163.21 at variety 0 → 163.20 / 163.23 / 163.34 / 163.45 at 0.25 / 0.5 / 1 / 2
with fraction 0.3 (this random model's latent seeds already differ widely, unlike Turbo's); the spread variety
alone adds (8 variety seeds, one latent seed) 0 → 1.59 / 2.60 / 3.57 / 4.18 at fraction 0.3, 2.78 / 4.47 / 6.01 /
7.22 at 0.5, and 6.85 / 10.94 / 15.01 / 17.81 when the varied prompt is kept for the whole schedule (fraction 1).
The same seed gives the same latent, bit for bit.
"""

import itertools

import pytest
import torch
from tiny import diffusers_transformer, save_comfyui

import zimage_core as zc
from nodes import graph
from zimage_core import variety


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return zc.load_transformer(save_comfyui(diffusers_transformer(seed=1), str(tmp_path_factory.mktemp("m") / "z.safetensors")),
                               dtype=torch.float32)


def prompt(n=12, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 20 + 0.5  # tokens of very different size, as Qwen3's are
    return torch.randn(n, dim, generator=g) * scale


def turbo(seed, v, fraction=0.3, batch=1):
    return graph.SamplerSettings(seed, 8, 1.0, 3.0, variety=v, variety_fraction=fraction), graph.empty_latent(64, 64, batch)


def test_noise_is_relative_to_each_token():
    x = prompt(64, 2560)
    for s in (0.25, 1.0):
        y = variety.perturb(x, s, variety.generator(1))
        ratio = (y - x).norm(dim=-1) / x.norm(dim=-1)
        assert abs(ratio.mean().item() - s) < 0.02 * s and ratio.std().item() < 0.05 * s
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        assert abs(cos.mean().item() - (1 + s * s) ** -0.5) < 0.02  # what the caption embedder's RMSNorm sees
    assert x.dtype == y.dtype and torch.equal(variety.perturb(x, 0.5, variety.generator(1)), variety.perturb(x, 0.5, variety.generator(1)))


def test_a_longer_prompt_keeps_the_noise_of_its_shared_tokens():
    x = prompt(20)
    short = variety.perturb(x[:12], 0.5, variety.generator(3)) - x[:12]
    long = variety.perturb(x, 0.5, variety.generator(3)) - x
    rel = lambda n, v: n / v.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    assert torch.allclose(rel(short, x[:12]), rel(long[:12], x[:12]), atol=1e-5)


def test_conditioning_ranges_split_at_the_fraction():
    c = graph.conditioning_from_embeds([prompt()])
    assert graph.vary_conditioning(c, 1, 0.0, 0.3) is c and graph.vary_conditioning(c, 1, 0.5, 0.0) is c
    out = graph.vary_conditioning(c, 1, 0.5, 0.3)
    assert [(d["start_percent"], d["end_percent"]) for _, d in out] == [(0.0, 0.3), (0.3, 1.0)]
    assert out[1][0] is c[0][0] and not torch.equal(out[0][0], c[0][0]) and out[0][1]["pooled_output"] is None
    ranged = [[c[0][0], {"start_percent": 0.5, "end_percent": 1.0}], [c[0][0], {"start_percent": 0.0, "end_percent": 0.2}]]
    out = graph.vary_conditioning(ranged, 1, 0.5, 0.3)  # an entry starting late is never noised; one ending early always is
    assert [(d["start_percent"], d["end_percent"]) for _, d in out] == [(0.5, 1.0), (0.0, 0.2)]
    assert out[0][0] is c[0][0] and not torch.equal(out[1][0], c[0][0])
    batch = graph.vary_conditioning(c, 1, 0.5, 0.3, batch=3)  # every image of a batch gets its own variation
    assert batch[0][0].shape[0] == 3 and not torch.equal(batch[0][0][0], batch[0][0][1])


def test_off_is_bit_identical_and_late_steps_see_the_clean_prompt(model, monkeypatch):
    c = graph.conditioning_from_embeds([prompt()])
    s0, lat = turbo(5, 0.0)
    plain = graph.sample_latent(model, c, None, lat, graph.SamplerSettings(5, 8, 1.0, 3.0))
    assert torch.equal(graph.sample_latent(model, c, None, lat, s0)["samples"], plain["samples"])
    seen = []
    orig = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, x, t, caps, **kw: (seen.append((float(t[0]), caps[0].clone())),
                                                                                 orig(self, x, t, caps, **kw))[1])
    s, _ = turbo(5, 0.5)
    graph.sample_latent(model, c, None, lat, s)
    # fraction 0.3 → σ ≥ 3·0.7/(1+2·0.7) = 0.875: the first 3 of 8 Turbo steps (σ 1, .95, .9) see the varied prompt
    clean = [torch.equal(caps, c[0][0][0]) for _, caps in seen]
    assert clean == [False] * 3 + [True] * 5, [round(1 - t, 3) for t, _ in seen]


def mean_pairwise(xs):
    return torch.stack([(a - b).norm() for a, b in itertools.combinations(xs, 2)]).mean().item()


def test_variety_spreads_the_seeds(model):
    """The sampler's own variety over 8 seeds, and (the standalone node, its own 8 seeds, one sampler seed) the
    spread that variety alone adds. On this random tiny model the latent noise already separates seeds widely
    (unlike Turbo), so the first grows only a little; the second starts at exactly 0."""
    c = graph.conditioning_from_embeds([prompt()])
    run = lambda cond, seed, v=0.0: graph.sample_latent(  # noqa: E731
        model, cond, None, graph.empty_latent(64, 64, 1), graph.SamplerSettings(seed, 8, 1.0, 3.0, variety=v))["samples"]
    seeds = {v: mean_pairwise([run(c, s, v) for s in range(8)]) for v in (0.0, 2.0)}
    alone = {v: mean_pairwise([run(graph.vary_conditioning(c, s, v, 0.3), 0) for s in range(8)]) for v in (0.5, 1.0, 2.0)}
    print(f"mean pairwise latent distance over 8 seeds: sampler variety {seeds}; node variety, one sampler seed {alone}")
    assert seeds[2.0] > seeds[0.0]
    assert 0 < alone[0.5] < alone[1.0] < alone[2.0]
    assert torch.equal(run(c, 3, 1.0), run(c, 3, 1.0))  # the same seed stays reproducible


def test_pipeline_variety_matches_the_node(model):
    """The standalone pipeline's --variety is the same perturbation as the sampler node's."""
    cap = prompt()
    s, lat = turbo(2, 0.7, batch=2)
    node = graph.sample_latent(model, graph.conditioning_from_embeds([cap]), None, lat, s)["samples"]
    parts = variety.vary([(cap.expand(2, -1, -1), 0.0, 1.0)], 2, 0.7, 0.3)
    entries = [zc.sampler.CondEntry(list(x.unbind(0)), start=a, end=b) for _, x, a, b in parts]
    direct = zc.sample(model, zc.comfy_noise((2, 16, 8, 8), 2), entries, sigmas=zc.sigmas(8, 3.0))
    assert torch.allclose(zc.from_model_space(direct), node, atol=1e-6)
