"""The package's shape: ``zimage_core`` imports form no circle (function-level imports included) and never ComfyUI."""

import ast
import pathlib

import zimage_core

ROOT = pathlib.Path(zimage_core.__file__).parent
COMFY = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "latent_preview")


def imports(root: pathlib.Path) -> dict[str, set[str]]:
    """module → the sibling modules it imports anywhere in its source (relative or absolute)."""
    graph = {}
    for f in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps |= {node.module} if node.module else {a.name for a in node.names}
                elif (node.module or "").startswith("zimage_core."):
                    deps.add(node.module.split(".")[1])
                assert (node.module or "").split(".")[0] not in COMFY, (f.name, node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("zimage_core.")}
                assert not any(a.name.split(".")[0] in COMFY for a in node.names), f.name
        graph[f.stem] = {d for d in deps if (root / f"{d}.py").exists() and d != "__init__"} - {f.stem}
    return graph


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path) or None: depth-first search for a back edge."""
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            return path[path.index(m):] + [m]
        if state.get(m) == 2:
            return None
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            found = visit(d, path + [m])
            if found:
                return found
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_no_import_circles():
    graph = imports(ROOT)
    assert {"transformer", "omni", "packing", "blocks", "offload", "sampler", "autoencoder", "vae_tiling"} <= graph.keys()
    assert circle(graph) is None, " → ".join(circle(graph))


def test_the_walker_finds_a_function_level_circle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    (tmp_path / "c.py").write_text("import zimage_core.a\n")
    graph = imports(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert circle(graph) == ["a", "b", "a"]
