#!/usr/bin/env python3
"""Probe of training recipes for the trained reranker (docs/trained-reranker.md, "Recipes tried"): trains the
student (32m config, --layers deep, MiniLM word embeddings) on the cached docstring groups and prints the
loss every 20 steps and NDCG@10 / median margin / BM25 NDCG@10 on the first --evalq held-out queries.

    python scripts/probe_trained_recipes.py --layers 2 --steps 400 --lr 2e-4 [--loss list|mse] [--hard 0.5]
        [--distill N] [--easy N] [--evalq 60]

--distill N: N steps of token-level hidden-state distillation from MiniLM first; --easy N: random instead
of BM25 negatives for the first N steps. Needs the [trained] and [eval] extras."""
import sys, time, json, random, os
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "runtimes")]
from ettin_export.trained import maker
from ettin_export.trained.student import write_student
from sentence_transformers import CrossEncoder
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=None)
ap.add_argument("--size", default="32m")
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--group", type=int, default=4)
ap.add_argument("--neg", type=int, default=7)
ap.add_argument("--maxlen", type=int, default=128)
ap.add_argument("--loss", default="list")
ap.add_argument("--hard", type=float, default=0.5)
ap.add_argument("--evalq", type=int, default=100)
ap.add_argument("--evalevery", type=int, default=100)
ap.add_argument("--queries", type=int, default=4000)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--distill", type=int, default=0)
ap.add_argument("--easy", type=int, default=0)
ap.add_argument("--dlr", type=float, default=1e-3)
a = ap.parse_args()
torch.set_num_threads(a.threads)
recipe = maker.Recipe(size=a.size, num_layers=a.layers, train_packages=maker.docdata.TRAIN_PACKAGES, train_queries=a.queries, negatives=a.neg)
t=time.time()
sides = maker.collected(tuple(recipe.train_packages)); train = sides["train"]
cache = maker.cache_root() / "trained" / f"probe-groups-{recipe.key()}.json"
cache.parent.mkdir(parents=True, exist_ok=True)
if cache.exists():
    d = json.loads(cache.read_text()); groups=[(g[0], g[1]) for g in d["groups"]]; labels=np.array(d["labels"],dtype=np.float32)
else:
    groups = maker.training_groups(recipe, train)
    teacher = maker.Teacher()
    cos = [teacher.cosine([(q, dd) for dd in docs]) for q, docs in groups]
    labels = np.stack(cos).astype(np.float32)
    cache.write_text(json.dumps({"groups": groups, "labels": labels.tolist()}))
print("data", len(groups), time.time()-t, "teacher top1 on train", float(np.mean(labels.argmax(1)==0)), flush=True)
out = maker.cache_root() / "trained" / f"probe-student-{a.size}-{a.layers}"
write_student(out, a.size, num_layers=a.layers, seed=0, max_seq_length=256)
torch.manual_seed(0)
model = CrossEncoder(str(out), device="cpu"); model.max_length = a.maxlen
beir = maker.heldout_beir_dir()
queries, corpus, qrels, cands = maker.read_heldout(beir)
qids = sorted(queries)[: a.evalq]
from ettin_export.evaluation.metrics import mean_metrics, ranked
def ev():
    model.eval()
    owners=[(q,d) for q in qids for d,_ in cands[q]]
    with torch.no_grad():
        s = model.predict([(queries[q], corpus[d]) for q,d in owners], batch_size=64, show_progress_bar=False)
    per={}
    for (q,d),x in zip(owners,s): per.setdefault(q,[]).append((d,float(x)))
    m = mean_metrics({q:qrels[q] for q in qids}, {q:ranked(v) for q,v in per.items()}, [10])
    marg=[ [x for d,x in v if d in qrels[q]][0]-np.median([x for _,x in v]) for q,v in per.items() if any(d in qrels[q] for d,_ in v)]
    bm = mean_metrics({q:qrels[q] for q in qids}, {q:[d for d,_ in cands[q]] for q in qids}, [10])
    model.train()
    return m["ndcg@10"], float(np.median(marg)), bm["ndcg@10"]
params=[p for p in model.parameters() if p.requires_grad]
if a.distill:
    from transformers import AutoModel, AutoTokenizer
    from ettin_export.trained.student import teacher_dir
    tdir = teacher_dir(); tm = AutoModel.from_pretrained(str(tdir)).eval(); tt = AutoTokenizer.from_pretrained(str(tdir))
    opt = torch.optim.AdamW(params, lr=a.dlr, weight_decay=0.01)
    warm=max(1,int(0.06*a.distill))
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s+1)/warm, max(0.0,(a.distill-s)/max(1,a.distill-warm))))
    rng=np.random.default_rng(1); t=time.time(); dl=[]
    for step in range(a.distill):
        b = rng.choice(len(groups), 16, replace=False)
        qs=[]; ds=[]
        for g in b:
            q, docs = groups[g]; j = int(rng.integers(len(docs))); qs.append(q); ds.append(docs[j])
        feats = model.preprocess(list(zip(qs, ds)))
        te = tt(qs, ds, padding=True, truncation=True, max_length=a.maxlen, return_tensors="pt")
        with torch.no_grad():
            target = tm(**te).last_hidden_state
        target = target / target.std()
        out = model(feats)
        st = out["token_embeddings"]
        n = min(st.shape[1], target.shape[1])
        mask = (feats["attention_mask"][:, :n] * te["attention_mask"][:, :n]).unsqueeze(-1).float()
        loss = (((st[:, :n] - target[:, :n]) ** 2) * mask).sum() / mask.sum() / st.shape[-1]
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params,1.0); opt.step(); sch.step()
        dl.append(loss.item())
        if (step+1)%20==0: print("distill", step+1, f"loss {np.mean(dl[-20:]):.3f} {(time.time()-t)/(step+1):.2f}s/step", flush=True)
    print("EVAL after distill", ev(), flush=True)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
warm=max(1,int(0.06*a.steps))
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s+1)/warm, max(0.0,(a.steps-s)/max(1,a.steps-warm))))
rng=np.random.default_rng(0); order=[]
model.train(); t=time.time(); losses=[]
G=1+a.neg
for step in range(a.steps):
    if len(order)<a.group: order.extend(rng.permutation(len(groups)).tolist())
    b, order = order[:a.group], order[a.group:]
    qs, ds = [], []
    for g in b:
        q, docs = groups[g]
        if step < a.easy:
            docs = [docs[0]] + [groups[int(rng.integers(len(groups)))][1][0] for _ in range(G-1)]
        qs += [q]*G; ds += docs[:G]
    feats = model.preprocess(list(zip(qs, ds)))
    logits = model(feats)["scores"].view(-1)
    logits = logits.view(a.group, G)
    tl = torch.tensor(labels[b][:, :G])
    if a.loss == "list":
        target = (1-a.hard)*torch.softmax(20*tl, -1) + a.hard*torch.nn.functional.one_hot(torch.zeros(a.group,dtype=torch.long), G)
        loss = -(target*torch.log_softmax(logits,-1)).sum(-1).mean()
    else:
        loss = torch.nn.functional.mse_loss(logits.view(-1), (20*(tl-0.4)).view(-1))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params,1.0); opt.step(); sch.step()
    losses.append(loss.item())
    if (step+1)%20==0: print(step+1, f"loss {np.mean(losses[-20:]):.3f} {(time.time()-t)/(step+1):.2f}s/step", flush=True)
    if (step+1)%a.evalevery==0 or step+1==a.steps:
        print("EVAL", step+1, ev(), f"t={time.time()-t:.0f}", flush=True)
