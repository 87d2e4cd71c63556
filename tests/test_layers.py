"""The import rules of the layers (../shared/STYLE.md): the storage and
reranker packages import nothing of xmr's other packages, and inference
never imports training: only the training package itself and the CLI's
training commands (inside their functions) reach it."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module, line, at module level) of each import in ``path``."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{a.name}" if base else a.name, node.lineno, id(node) in top) for a in node.names]
    return found


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_indexer_and_reranker_import_nothing_of_ours_but_themselves():
    bad = []
    for folder, others in (("indexer", ("retrieval", "reranker")), ("reranker", ("retrieval", "indexer"))):
        for path in _files(folder):
            bad += [f"{path.relative_to(ROOT)}:{line} imports {name}" for name, line, _ in _imports(path)
                    if name.split(".")[0] in others]
    assert not bad, "\n".join(bad)


def test_inference_never_imports_training():
    bad = []
    for folder in ("retrieval", "indexer", "reranker"):
        for path in _files(folder):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("retrieval", "training"):
                continue
            for name, line, at_top in _imports(path):
                if not name.startswith("retrieval.training"):
                    continue
                if rel == Path("retrieval/cli.py") and not at_top:
                    continue  # a training command's own lazy import
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_rules_see_a_broken_one(tmp_path, monkeypatch):
    """The checker itself: a relative import of training from the encoders is caught."""
    fake = tmp_path / "retrieval" / "encoders" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..training import checkpoint\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _imports(fake) == [("retrieval.training.checkpoint", 1, True)]
