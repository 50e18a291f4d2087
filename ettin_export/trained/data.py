"""Real English text for a trained reranker: docstrings of this Python's standard library, read with `ast`
(nothing is imported or run), turned into (query, document) pairs.

An object (function, class or method) with a docstring of at least two sentences gives one pair:

    query    = the docstring's first sentence ("Return the number of ...")
    document = title: the object's dotted name ("json.decoder.JSONDecoder.decode"),
               text:  the rest of the docstring (whitespace collapsed, at most MAX_DOC_WORDS words)

Sources are split by top-level module: the held-out side is the stdlib's modules n-z (leading underscores
ignored, lower-cased), the training side the stdlib's a-m plus the installed packages of TRAIN_PACKAGES
(what `pip install ettin-export[export]` brings; their versions are recorded), so no module's text is on
both. Texts that appear on both sides
anyway (a C accelerator's Python twin, a copied docstring) are dropped from the held-out side, and a
query text that occurs more than once on a side is dropped there (its qrels would be ambiguous).

Everything is sorted and seeded; the text comes from the machine, so `dataset_fingerprint` (a sha256 of
the pairs) tells whether two machines made the same data. Python 3.11.7's stdlib is the reference.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MAX_DOC_WORDS = 100
MIN_DOC_WORDS = 8
QUERY_WORDS = (4, 40)
# Folders of the stdlib that are not library text (tests, demos, vendored code, encodings tables).
SKIP_PARTS = {"test", "tests", "idle_test", "turtledemo", "site-packages", "dist-packages", "encodings",
              "__pycache__", "lib2to3", "ensurepip", "pydoc_data", "__phello__"}
TRAIN_LETTERS = "abcdefghijklm"
# Third-party text for the training side only (transformers' per-model folders are left out: thousands of
# near-copies of one docstring).
TRAIN_PACKAGES = ("huggingface_hub", "numpy", "rich", "sentence_transformers", "torch", "transformers")
SKIP_PREFIXES = (("transformers", "models"),)


@dataclass(frozen=True)
class DocPair:
    source: str  # top-level module (the split's unit)
    doc_id: str  # dotted name of the object, unique
    query: str
    title: str
    text: str

    @property
    def document(self) -> str:
        """The text a reranker sees, BEIR's rule: (title + " " + text).strip()."""
        return (self.title + " " + self.text).strip()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def side_of(source: str) -> str:
    """'train' for top-level modules a-m, 'heldout' for n-z (leading underscores ignored)."""
    first = source.lstrip("_")[:1].lower()
    return "train" if first and first in TRAIN_LETTERS else "heldout"


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\]'\"`])[.!?](?=\s|$)")


def split_docstring(doc: str) -> tuple[str, str] | None:
    """(first sentence, the rest) of a docstring, or None when it is too short to make a pair."""
    paragraphs = [p for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    if not paragraphs:
        return None
    first = _squash(paragraphs[0])
    match = _SENTENCE_END.search(first)
    if match:
        query, rest = first[: match.end()], first[match.end():]
    else:
        query, rest = first, ""
    rest = _squash(rest + " " + " ".join(paragraphs[1:]))
    query = query.strip()
    if not (QUERY_WORDS[0] <= len(query.split()) <= QUERY_WORDS[1]):
        return None
    if len(rest.split()) < MIN_DOC_WORDS or ">>>" in query:
        return None
    return query, " ".join(rest.split()[:MAX_DOC_WORDS])


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def iter_source_files(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_PARTS for part in rel.parts) or rel.parts[0].startswith("config-") \
                or any(rel.parts[: len(prefix)] == prefix for prefix in SKIP_PREFIXES):
            continue
        yield path


def pairs_of_file(root: Path, path: Path) -> list[DocPair]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    module = _module_name(root, path)
    source = module.split(".")[0]
    out: list[DocPair] = []

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc and not child.name.startswith("_"):
                    split = split_docstring(doc)
                    if split:
                        out.append(DocPair(source, name, split[0], name, split[1]))
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    visit(tree, module)
    return out


def package_versions(packages=TRAIN_PACKAGES) -> dict[str, str | None]:
    import importlib.metadata as metadata

    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _package_root(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def collect(root: Path | None = None, train_packages=TRAIN_PACKAGES) -> dict[str, list[DocPair]]:
    """{'train': [...], 'heldout': [...]}, each sorted by doc id, deduplicated as the module doc says."""
    root = stdlib_root() if root is None else Path(root)
    sides: dict[str, dict[str, DocPair]] = {"train": {}, "heldout": {}}
    for path in iter_source_files(root):
        for pair in pairs_of_file(root, path):
            sides[side_of(pair.source)].setdefault(pair.doc_id, pair)
    for name in sorted(train_packages):
        package_root = _package_root(name)
        if package_root is None:
            continue
        for path in iter_source_files(package_root / name):
            for pair in pairs_of_file(package_root, path):
                sides["train"].setdefault(pair.doc_id, pair)
    result = {}
    train_texts = {p.query for p in sides["train"].values()} | {p.text for p in sides["train"].values()}
    for side, by_id in sides.items():
        pairs = sorted(by_id.values(), key=lambda p: p.doc_id)
        if side == "heldout":
            pairs = [p for p in pairs if p.query not in train_texts and p.text not in train_texts]
        query_counts: dict[str, int] = {}
        text_counts: dict[str, int] = {}
        for p in pairs:
            query_counts[p.query] = query_counts.get(p.query, 0) + 1
            text_counts[p.text] = text_counts.get(p.text, 0) + 1
        result[side] = [p for p in pairs if query_counts[p.query] == 1 and text_counts[p.text] == 1]
    return result


def dataset_fingerprint(pairs: list[DocPair]) -> str:
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.source, p.doc_id, p.query, p.title, p.text], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def sources(pairs: list[DocPair]) -> list[str]:
    return sorted({p.source for p in pairs})
