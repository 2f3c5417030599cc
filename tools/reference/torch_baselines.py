#!/usr/bin/env python3
"""PyTorch eager baselines for DispNative's GPU benchmarks (GPU machine only; the engine never runs Python).

  python3 tools/reference/torch_baselines.py infer [--tokens 2048] [--decode 128] [--keep 0.65]
      LLaMA-2-7B shape, random bf16 weights: dense prefill and batch-1 decode, and the DISP-pruned model written
      the straightforward way (index_select of the kept channels, sliced matmuls, index_add_ into the residual).
      Compare with `DispNative.KernelBench infer`.
  python3 tools/reference/torch_baselines.py train [--tokens 2048] [--layers 32]
      One DISP-LLM masked training step: frozen bf16 LLaMA-2-7B, fp32 soft masks on the five sites of every layer,
      cross-entropy, backward to the masks only (the hypernetwork and regularizer are tiny and left out). Prints
      seconds per step and peak GPU memory.

Both use F.scaled_dot_product_attention (causal) and no compilation: this is "PyTorch eager".
"""
import argparse
import time

import torch
import torch.nn.functional as F

D, FFN, HEADS, HEAD_DIM, VOCAB, LAYERS = 4096, 11008, 32, 128, 32000, 32
DEV, DT = "cuda", torch.bfloat16


def rand(*shape):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * 0.02).to(DT)


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def rope_tables(positions):
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=DEV, dtype=torch.float32) / HEAD_DIM))
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def rope(x, cos, sin):  # x [T, H, hd], half rotation
    a, b = x[..., : HEAD_DIM // 2].float(), x[..., HEAD_DIM // 2 :].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * c - b * s, b * c + a * s], -1).to(x.dtype)


def make_layer(keep):
    def subset(n):
        return None if keep >= 1 else torch.randperm(n, device=DEV)[: max(1, round(keep * n))].sort().values

    idx = {k: subset(n) for k, n in [("attn_in", D), ("attn_out", D), ("mlp_in", D), ("mlp_mid", FFN), ("mlp_out", D)]}
    w = lambda k, n: n if idx[k] is None else idx[k].numel()
    ai, ao, mi, mm, mo = w("attn_in", D), w("attn_out", D), w("mlp_in", D), w("mlp_mid", FFN), w("mlp_out", D)
    return dict(idx=idx, n1=torch.ones(D, device=DEV, dtype=DT), n2=torch.ones(D, device=DEV, dtype=DT),
                wq=rand(D, ai), wk=rand(D, ai), wv=rand(D, ai), wo=rand(ao, D),
                wg=rand(mm, mi), wu=rand(mm, mi), wd=rand(mo, mm))


def layer_forward(L, x, cos, sin, cache=None, masks=None):
    """x [T, D] (f32 residual). cache: dict with k, v [S, H, hd] and length; masks: dict of 5 f32 vectors."""
    idx = L["idx"]
    t = x.shape[0]

    def read(norm, site):  # norm over the full row, then the site's mask and kept channels
        h = rms_norm(x, L[norm])
        if masks is not None:
            h = h * masks[site]
        return (h if idx[site] is None else h.index_select(1, idx[site])).to(DT)

    def write(o, site):  # back into the residual: index_add of the kept channels
        o = o.float() if masks is None else o.float() * masks[site]
        return x + o if idx[site] is None else x.index_add(1, idx[site], o)

    h = read("n1", "attn_in")
    q = rope((h @ L["wq"].T).view(t, HEADS, HEAD_DIM), cos, sin)
    k = rope((h @ L["wk"].T).view(t, HEADS, HEAD_DIM), cos, sin)
    v = (h @ L["wv"].T).view(t, HEADS, HEAD_DIM)
    if cache is not None:
        n = cache["length"]
        cache["k"][n : n + t] = k
        cache["v"][n : n + t] = v
        k, v = cache["k"][: n + t], cache["v"][: n + t]
    # Prefill always starts at position 0 here, so is_causal's top-left alignment is right.
    a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=t > 1)
    x = write(a.transpose(0, 1).reshape(t, D) @ L["wo"].T, "attn_out")
    h = read("n2", "mlp_in")
    m = F.silu(h @ L["wg"].T) * (h @ L["wu"].T)
    if masks is not None:
        m = m * masks["mlp_mid"].to(DT)
    return write(m @ L["wd"].T, "mlp_out")


def build(keep, layers):
    torch.manual_seed(0)
    return dict(emb=rand(VOCAB, D), norm=torch.ones(D, device=DEV, dtype=DT), head=rand(VOCAB, D),
                layers=[make_layer(keep) for _ in range(layers)])


def forward(M, tokens, start, caches=None, masks=None, last_only=True):
    pos = torch.arange(start, start + tokens.numel(), device=DEV)
    cos, sin = rope_tables(pos)
    x = M["emb"][tokens].float()
    for i, L in enumerate(M["layers"]):
        x = layer_forward(L, x, cos, sin, None if caches is None else caches[i], None if masks is None else masks[i])
    if caches is not None:
        for c in caches:
            c["length"] += tokens.numel()
    h = rms_norm(x[-1:] if last_only else x, M["norm"]).to(DT)
    return (h @ M["head"].T).float()


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def infer(args):
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    tokens = torch.randint(0, VOCAB, (args.tokens,), device=DEV)
    for name, keep in [("dense", 1.0), (f"pruned (index_select/index_add, every site {args.keep:.0%})", args.keep)]:
        M = build(keep, LAYERS)
        prefill = timed(lambda: forward(M, tokens, 0), 5)
        caches = [dict(k=torch.empty(16 + args.decode + 8, HEADS, HEAD_DIM, device=DEV, dtype=DT),
                       v=torch.empty(16 + args.decode + 8, HEADS, HEAD_DIM, device=DEV, dtype=DT), length=0) for _ in M["layers"]]
        logits = forward(M, tokens[:16], 0, caches)
        tok = logits.argmax(-1)
        for _ in range(3):
            tok = forward(M, tok, caches[0]["length"], caches).argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.decode):
            tok = forward(M, tok, caches[0]["length"], caches).argmax(-1)
            tok.item()
        rate = args.decode / (time.perf_counter() - t0)
        print(f"{name}: prefill {args.tokens} tokens {prefill * 1e3:.1f} ms, decode {rate:.1f} tok/s")
        del M, caches
        torch.cuda.empty_cache()


def train(args):
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    M = build(1.0, args.layers)
    for p in [M["emb"], M["head"]]:
        p.requires_grad_(False)
    logits_param = [{k: torch.zeros(n, device=DEV, requires_grad=True)
                     for k, n in [("attn_in", D), ("attn_out", D), ("mlp_in", D), ("mlp_mid", FFN), ("mlp_out", D)]}
                    for _ in range(args.layers)]
    tokens = torch.randint(0, VOCAB, (args.tokens + 1,), device=DEV)

    def step():
        masks = [{k: torch.sigmoid((v + 3.0) / 0.4) for k, v in lp.items()} for lp in logits_param]
        logits = forward(M, tokens[:-1], 0, masks=masks, last_only=False)
        loss = F.cross_entropy(logits, tokens[1:])
        loss.backward()
        for lp in logits_param:
            for v in lp.values():
                v.grad = None
        return loss

    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, 5)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"masked training step, {args.layers} layers, block {args.tokens}: {sec:.3f} s/step, peak {peak:.1f} GiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["infer", "train"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.65)
    ap.add_argument("--layers", type=int, default=LAYERS)
    a = ap.parse_args()
    infer(a) if a.mode == "infer" else train(a)
