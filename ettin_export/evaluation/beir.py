"""BEIR folders and TREC run files, read strictly: every refusal names the file (and line) and what to do.

A BEIR folder (what `beir.datasets.data_loader.GenericDataLoader` reads):

    corpus.jsonl       {"_id": "d1", "title": "...", "text": "..."}   one document a line ("title" optional)
    queries.jsonl      {"_id": "q1", "text": "..."}                   one query a line
    qrels/SPLIT.tsv    query-id <TAB> corpus-id <TAB> score          a header line, then integer grades

As in BEIR, only queries with qrels are evaluated (the others are skipped and counted), a document's text
for a reranker is `(title + " " + text).strip()`, and a grade > 0 is relevant (trec_eval's default level).

A TREC run (what trec_eval and ranx read): `qid Q0 docid rank score tag`, whitespace-separated, one
candidate a line. The order is the score's (descending; equal scores by doc id ascending, the rule of
`ettin_export.evaluation.metrics`); the rank column is checked to be an integer and otherwise ignored, as
trec_eval ignores it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ettin_runtime.errors import EttinError

BEIR_LAYOUT = ("corpus.jsonl ({\"_id\", \"title\", \"text\"} lines), queries.jsonl ({\"_id\", \"text\"} lines) and "
               "qrels/SPLIT.tsv (a 'query-id<TAB>corpus-id<TAB>score' header, then one judgement a line)")


class DataError(EttinError, ValueError):
    """A BEIR folder or TREC run file that cannot be used: the message names the file, the line, what was
    found and what to do."""


@dataclass
class BeirData:
    root: Path
    split: str
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # every query of queries.jsonl
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade, only queries that are in queries.jsonl
    qrels_unknown_queries: int = 0  # qrels lines naming a query queries.jsonl does not have (skipped)
    qrels_unknown_docs: int = 0  # judged doc ids the corpus does not have (kept: unretrievable, count for recall)
    notes: list[str] = field(default_factory=list)

    @property
    def evaluated_query_ids(self) -> list[str]:
        """The queries with qrels, in queries.jsonl's order (BEIR evaluates these and skips the others)."""
        return [query_id for query_id in self.queries if query_id in self.qrels]

    def document(self, doc_id: str) -> str:
        return document_text(self.corpus[doc_id])

    def counts(self) -> dict:
        return {
            "documents": len(self.corpus), "queries": len(self.queries),
            "queries_with_qrels": len(self.qrels), "queries_skipped_no_qrels": len(self.queries) - len(self.qrels),
            "qrels": sum(len(judged) for judged in self.qrels.values()),
            "qrels_lines_unknown_query": self.qrels_unknown_queries,
            "qrels_unknown_documents": self.qrels_unknown_docs,
        }


def document_text(doc: dict[str, str]) -> str:
    """What BEIR's rerankers score a document as: title + " " + text, stripped."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


def load_beir(root: str | Path, split: str = "test") -> BeirData:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: {'not a folder' if root.exists() else 'no such folder'}. Name a BEIR "
                        f"folder holding {BEIR_LAYOUT}.")
    files = {"corpus": root / "corpus.jsonl", "queries": root / "queries.jsonl",
             "qrels": root / "qrels" / f"{split}.tsv"}
    missing = [str(path.relative_to(root)) for path in files.values() if not path.is_file()]
    if missing:
        others = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        hint = f" (qrels splits found: {', '.join(others)}; choose one with --split)" if others and \
            f"qrels/{split}.tsv" in missing else ""
        raise DataError(f"--data {root} lacks {', '.join(missing)}{hint}. A BEIR folder holds {BEIR_LAYOUT}.")
    corpus = {doc_id: {"title": record.get("title") or "", "text": record.get("text") or ""}
              for doc_id, record in _read_jsonl(files["corpus"], ("title", "text"), required=("text",))}
    if not corpus:
        raise DataError(f"{files['corpus']} holds no documents.")
    queries = {query_id: record["text"]
               for query_id, record in _read_jsonl(files["queries"], ("text",), required=("text",))}
    if not queries:
        raise DataError(f"{files['queries']} holds no queries.")
    data = BeirData(root=root, split=split, corpus=corpus, queries=queries, qrels={})
    _read_qrels(files["qrels"], data)
    if not data.qrels:
        raise DataError(
            f"{files['qrels']}: none of its {data.qrels_unknown_queries} judgements names a query of "
            f"{files['queries']} (no overlap: is it the qrels of another data set?). Check the query ids "
            "(the qrels' first column must be the queries' \"_id\")."
        )
    return data


def _read_jsonl(path: Path, fields: tuple[str, ...], required: tuple[str, ...]):
    seen: set[str] = set()
    try:
        handle = open(path, encoding="utf-8")
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}.") from error
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object.") from None
            except UnicodeDecodeError:  # pragma: no cover - raised by the reader, below
                raise
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with \"_id\" and {', '.join(map(repr, fields))}, "
                                f"got {line.strip()[:80]}")
            doc_id = record.get("_id")
            if isinstance(doc_id, int) and not isinstance(doc_id, bool):
                doc_id = str(doc_id)
            if not isinstance(doc_id, str) or not doc_id:
                raise DataError(f"{where}: no \"_id\" string (got {line.strip()[:80]}).")
            for name in fields:
                value = record.get(name)
                if value is None and name not in required:
                    continue
                if not isinstance(value, str):
                    raise DataError(f"{where}: \"{name}\" must be a string (got {json.dumps(value)[:60]}).")
            if doc_id in seen:
                raise DataError(f"{where}: the \"_id\" {doc_id!r} was already used on an earlier line; ids must be "
                                "unique.")
            seen.add(doc_id)
            yield doc_id, record


def _read_qrels(path: Path, data: BeirData) -> None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}.") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if number == 1 and not _is_int(columns[-1].strip()):
            continue  # BEIR's header: query-id, corpus-id, score
        if len(columns) != 3:
            raise DataError(f"{path}:{number}: expected 3 tab-separated columns (query-id, corpus-id, score), got "
                            f"{len(columns)}: {line[:80]!r}")
        query_id, doc_id, grade = (column.strip() for column in columns)
        if not _is_int(grade):
            raise DataError(f"{path}:{number}: the score {grade!r} is not an integer grade.")
        if query_id not in data.queries:
            data.qrels_unknown_queries += 1
            continue
        data.qrels.setdefault(query_id, {})[doc_id] = int(grade)
        if doc_id not in data.corpus:
            data.qrels_unknown_docs += 1
    if data.qrels_unknown_queries and data.qrels:
        data.notes.append(f"{data.qrels_unknown_queries} qrels lines name queries that queries.jsonl does not "
                          "have: skipped")
    if data.qrels_unknown_docs:
        data.notes.append(f"{data.qrels_unknown_docs} judged documents are not in the corpus (no first stage can "
                          "return them; they count against recall)")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_run(path: str | Path, data: BeirData) -> dict[str, list[tuple[str, float]]]:
    """A TREC run file: query id -> [(doc id, score)] in the file's order. Every query and document it names
    must be in the BEIR folder; a (query, doc) pair may appear once."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"--run {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read --run {path}: {error}.") from error
    run: dict[str, list[tuple[str, float]]] = {}
    seen: set[tuple[str, str]] = set()
    unknown_queries: dict[str, int] = {}
    unknown_docs: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        columns = line.split()
        where = f"{path}:{number}"
        if len(columns) != 6:
            raise DataError(f"{where}: a TREC run line has 6 fields 'qid Q0 docid rank score tag', got "
                            f"{len(columns)}: {line[:80]!r}")
        query_id, _, doc_id, rank, score, _ = columns
        if not _is_int(rank):
            raise DataError(f"{where}: the rank {rank!r} is not an integer ('qid Q0 docid rank score tag').")
        try:
            value = float(score)
        except ValueError:
            raise DataError(f"{where}: the score {score!r} is not a number ('qid Q0 docid rank score tag').") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: the score {score!r} is not finite.")
        if query_id not in data.queries:
            unknown_queries.setdefault(query_id, number)
            continue
        if doc_id not in data.corpus:
            unknown_docs.setdefault(doc_id, number)
            continue
        if (query_id, doc_id) in seen:
            raise DataError(f"{where}: query {query_id!r} lists document {doc_id!r} a second time; a run names "
                            "each (query, document) once.")
        seen.add((query_id, doc_id))
        run.setdefault(query_id, []).append((doc_id, value))
    for what, unknown, source in (("query", unknown_queries, "queries.jsonl"), ("document", unknown_docs,
                                                                                 "corpus.jsonl")):
        if unknown:
            shown = ", ".join(f"{key!r} (line {line})" for key, line in list(unknown.items())[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise DataError(f"--run {path} names {len(unknown)} {what} id(s) that {data.root / source} does not "
                            f"have: {shown}{more}. Is the run for this data set (and --split)?")
    if not run:
        raise DataError(f"--run {path} holds no candidates.")
    return run
