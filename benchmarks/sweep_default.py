"""The sweep that chose the default method (MNIST-5k, parallel workers, one JSON line per result):

    python benchmarks/sweep_default.py OUT.jsonl WORKERS      # SWEEP_ONLY=name,name to run a subset
"""
import json, os, sys, time
import multiprocessing as mp

# The defaults at the time of the sweep; each grid entry overrides them.
SWEEP_BASE = dict(lr=1e-4, distill_weight=1.0, max_steps=400, distill_halve_every=0)


def job(spec):
    import torch
    from streamer.engine.data import load_splits
    from streamer.engine.models import Normalized, mnist_cnn, digits_cnn, load_weights
    from streamer.engine.unlearn import Unlearner, method_config, Fragment
    from streamer.engine.evaluate import accuracy
    name, over, mode, seed, ds = spec
    over = dict(over); use_buffer = over.pop("_buffer", False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sp = load_splits(ds)
    m = Normalized(mnist_cnn() if ds == "mnist5k" else digits_cnn(), (0.,), (1.,)); load_weights(m, f"artifacts/{ds}.pt"); m.to(dev).eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(sp.train), generator=g)[:128]
    method = over.pop("method", "default")
    base = SWEEP_BASE if method == "default" else {"max_steps": 400}
    u = Unlearner(m, method_config(method, seed=seed, **{**base, **over}), 10, buffer=sp.buffer if use_buffer else None)
    t = time.time(); rows = []
    frag = 64 if mode == "single" else 8
    for f in range(1 if mode == "single" else 16):
        i = idx[frag * f: frag * f + frag]
        o = u.unlearn(Fragment(sp.train.x[i], sp.train.y[i], torch.full((len(i),), -1)))
        k = frag * (f + 1)
        if mode == "single" or k in (8, 32, 64, 128):
            rows.append(dict(name=name, mode=mode, seed=seed, ds=ds, k=k, stop=o.stopped_by, steps=o.steps,
                             forget=accuracy(m, sp.train.x[idx[:k]], sp.train.y[idx[:k]]),
                             test=accuracy(m, sp.audit.x, sp.audit.y), secs=round(time.time() - t, 1)))
    return rows

if __name__ == "__main__":
    out, workers = sys.argv[1], int(sys.argv[2])
    base = {}
    grid = {
        "d1": dict(distill_weight=1.0),
        "d0": dict(distill_weight=0.0),
        "d3": dict(distill_weight=3.0),
        "d10": dict(distill_weight=10.0),
        "d3_lr3e-4": dict(distill_weight=3.0, lr=3e-4),
        "d10_lr3e-4": dict(distill_weight=10.0, lr=3e-4),
        "d10_lr1e-3": dict(distill_weight=10.0, lr=1e-3),
        "d30_lr1e-3": dict(distill_weight=30.0, lr=1e-3),
        "d3_m0.2_lr3e-4": dict(distill_weight=3.0, margin=0.2, lr=3e-4),
        "d10_m3_lr3e-4": dict(distill_weight=10.0, margin=3.0, lr=3e-4),
        "d3_adv0_lr3e-4": dict(distill_weight=3.0, adv_weight=0.0, lr=3e-4),
        "d3_adv1_lr3e-4": dict(distill_weight=3.0, adv_weight=1.0, lr=3e-4),
        "d3_T1_lr3e-4": dict(distill_weight=3.0, distill_temperature=1.0, lr=3e-4),
        "d3_T4_lr3e-4": dict(distill_weight=3.0, distill_temperature=4.0, lr=3e-4),
        "d3_db256_lr3e-4": dict(distill_weight=3.0, distill_batch=256, adv_batch=256, lr=3e-4),
        "d3_eps0.4_lr3e-4": dict(distill_weight=3.0, pgd_eps_ratio=0.4, lr=3e-4),
        "d3_cap1000": dict(distill_weight=3.0, max_steps=1000),
        "d10_cap1000": dict(distill_weight=10.0, max_steps=1000),
        "d10_cap1000_lr3e-4": dict(distill_weight=10.0, max_steps=1000, lr=3e-4),
        "d3_imp100_lr3e-4": dict(distill_weight=3.0, imp_lambda=100.0, lr=3e-4),
        "d3_buf_lr3e-4": dict(distill_weight=3.0, _buffer=True, lr=3e-4),
        "d1_buf": dict(distill_weight=1.0, _buffer=True),
        "d0_buf_lr3e-4": dict(distill_weight=0.0, _buffer=True, lr=3e-4),
        "neggrad": dict(method="neggrad"),
        "advimp": dict(method="adv+imp"),
        "sgd_d3": dict(distill_weight=3.0, optimizer="sgd", lr=1e-2),
    }
    sel = os.environ.get("SWEEP_ONLY")
    specs = [(n, o, mode, s, "mnist5k") for n, o in grid.items() if not sel or n in sel.split(",")
             for mode, s in (("single", 0), ("single", 1), ("cont", 0))]
    specs.sort(key=lambda s: s[2] != "cont")  # long continual jobs first
    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool, open(out, "w") as fh:
        for rows in pool.imap_unordered(job, specs):
            for r in rows:
                fh.write(json.dumps(r) + "\n"); fh.flush()
                print(json.dumps(r), f"t={time.time()-t:.0f}s", flush=True)
