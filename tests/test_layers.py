"""The layering of model/, modalities/ and data/ (docs/design.md, "Layers"), checked on the import graph.

Bottom to top: the primitives (segment types, image and audio loading, model parts such as the EfficientNet
and Whisper modules) import no plugin; the plugins (`metalm.modalities.<kind>`) import primitives; the
assembly (config, docked encoders, collator, processor, layouts) reaches the plugins only through the
registry module `metalm.modalities`. The graph is built from the source with `ast`: every import statement,
at module level, inside a function or under `if TYPE_CHECKING:` (a type-only import still says which
layer knows which).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERED = ("metalm.model", "metalm.modalities", "metalm.data")
REGISTRY = "metalm.modalities"

# Modules other work still has to untangle, left out of the cycle checks; shrink this list, never grow it.
CYCLE_ALLOWLIST: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "metalm").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every name an import statement anywhere in `tree` reaches (a module, or module.attribute)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """metalm module -> the metalm modules it imports."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        names = _imported(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {target for target in names if target in modules and target != name}
    return graph


def _registry_loads() -> set[str]:
    """The plugins the registry imports on its first lookup (`BUILTIN_MODALITIES`, read from its source)."""
    tree = ast.parse((SRC / "metalm" / "modalities" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "BUILTIN_MODALITIES" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("metalm.modalities defines no BUILTIN_MODALITIES")


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _layered(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    keep = {m for m in graph if m.startswith(LAYERED) and m not in CYCLE_ALLOWLIST}
    return {m: graph[m] & keep for m in keep}


def test_no_import_cycle_among_model_modalities_and_data() -> None:
    assert cycles(_layered(import_graph())) == []


def test_plugins_never_reach_back_to_what_consults_the_registry() -> None:
    # Counting the registry's lazy import of the built-in plugins, the only cycle left is the registration
    # itself (plugin -> registry -> plugin), inside modalities/: a plugin's dependencies never lead back
    # to a module that consults the registry.
    graph = _layered(import_graph())
    graph[REGISTRY] |= _registry_loads()
    for component in cycles(graph):
        outside = sorted(m for m in component if not m.startswith(REGISTRY))
        assert not outside, f"a cycle through the registry reaches {outside}"


def test_model_and_data_reach_the_plugins_only_through_the_registry() -> None:
    arrows = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        if source.startswith(("metalm.model", "metalm.data"))
        for target in targets
        if target.startswith(f"{REGISTRY}.")
    ]
    assert arrows == []


def test_the_plugins_import_no_assembly() -> None:
    # What a plugin may import of metalm: the registry, the interface, and the primitives below it.
    assembly = {
        "metalm.data.segments",
        "metalm.data.processor",
        "metalm.data.layouts",
        "metalm.model.configuration_metalm",
        "metalm.model.encoders",
        "metalm.model.modeling_metalm",
    }
    graph = import_graph()
    for plugin in sorted(m for m in graph if m.startswith(f"{REGISTRY}.")):
        assert not graph[plugin] & assembly, f"{plugin} imports {sorted(graph[plugin] & assembly)}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_an_encoded_segment_carries_one_payload_under_the_name_its_plugin_gives() -> None:
    from metalm.data.segment_types import EncodedSegment

    span = EncodedSegment("text", input_ids=[5, 6], target_ids=[5, 6])
    assert (span.payload, span.input_ids, span.pixel_values) == ([5, 6], [5, 6], None)
    clip = EncodedSegment("audio", payload="features")
    assert (clip.payload, clip.input_ids) == ("features", None)
    try:
        EncodedSegment("text", input_ids=[1], pixel_values=[2])
    except TypeError:
        pass
    else:
        raise AssertionError("two payloads were accepted")


def test_the_part_types_live_in_their_plugins_and_the_package_only() -> None:
    import metalm
    from metalm.data import processor
    from metalm.modalities.audio import AudioInput
    from metalm.modalities.text import Encode
    from metalm.modalities.vision import ImageInput

    assert (metalm.Encode, metalm.ImageInput, metalm.AudioInput) == (Encode, ImageInput, AudioInput)
    # The processor names no kind: no part types by name, no kind-named conveniences.
    assert not any(hasattr(processor, name) for name in ("Encode", "ImageInput", "AudioInput"))
    assert not any(hasattr(processor.MetaLMProcessor, name) for name in ("image_processors", "fits_encoder"))


def test_a_packaged_encoder_of_another_kind_is_refused_before_loading() -> None:
    import pytest

    from metalm.model.configuration_metalm import MetaLMConfigError
    from metalm.recipe import EncoderRecipe, _build_encoder

    recipe = EncoderRecipe(name="reader", kind="text", source="packaged:efficientnet-lite0")
    with pytest.raises(MetaLMConfigError, match="is a vision encoder"):
        _build_encoder(recipe, decoder_tok=None)


# Files that may spell a media kind's word: the record schema (its fields "image" and "audio", the
# interleaved part types), the config schema and its messages, the task catalogue's `media` setting.
KIND_WORD_ALLOWLIST = {
    "metalm.data.records",
    "metalm.data.record_kinds",
    "metalm.data.record_parsing",
    "metalm.training.config_schema",
    "metalm.training.config_messages",
    "metalm.evaluation.catalogue",
}
MEDIA_KINDS = {"vision", "audio"}
# Calls whose string argument is an encoder kind.
KIND_LOOKUPS = {"encoders_of_kind", "preprocessors_of_kind", "get_modality"}


def _names_kind(node: ast.AST) -> bool:
    """`kind`, `x.kind` or `x["kind"]`."""
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "kind"
    return (node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)) == "kind"


def _kind_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, literal) of each media kind named as a kind: "vision" anywhere (no record field is called
    that), a kind literal handed to a kind lookup, or compared with a `kind`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == "vision":
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in KIND_LOOKUPS:
                found += [
                    (arg.lineno, arg.value)
                    for arg in node.args
                    if isinstance(arg, ast.Constant) and arg.value in MEDIA_KINDS
                ]
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_names_kind(side) for side in sides):
                found += [
                    (s.lineno, s.value)
                    for s in sides
                    if isinstance(s, ast.Constant) and s.value in MEDIA_KINDS
                ]
    return found


def test_only_the_plugins_name_a_media_kind() -> None:
    """What depends on a kind lives in its plugin (docs/design.md, "Modality plugins"): the rest of metalm
    reaches images and speech through the registry (`modality_of_field`, `encoders_of_field`, ...)."""
    offenders = []
    for name, path in _modules().items():
        if name.startswith(REGISTRY) or name in KIND_WORD_ALLOWLIST:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        offenders += [f"{name}:{line}: {value!r}" for line, value in _kind_literals(tree)]
    assert not offenders, "media kinds named outside metalm.modalities:\n" + "\n".join(offenders)


def test_the_kind_literal_check_finds_a_kind() -> None:
    source = 'a = config.encoders_of_kind("audio")\nb = {"vision": 1}\nc = spec["kind"] == "audio"\n'
    found = _kind_literals(ast.parse(source))
    assert sorted(found) == [(1, "audio"), (2, "vision"), (3, "audio")]
    assert not _kind_literals(ast.parse('clips = turn.get("audio")\nref = rec["audio"]\n'))
