# Emulates the split-KV decode kernels of kernels/attention_decode.cu on the CPU, lane by lane: the key groups (G lanes
# of 16 bytes per key, G a power of two), the warp-uniform key loop with DECODE_UNROLL steps, the per-lane online
# softmax, the xor-shuffle merges of the key slots, the merge of the warps, the splits' shares (empty ones included)
# and attention_decode_combine. Compares with plain softmax attention of one query, with GQA and a sliding window.
# It checks the index arithmetic and the merging algebra; numerics and synchronisation are checked by
# `DispNative selftest` on a GPU. Run: python3 tools/emulate/attention_decode.py  (needs numpy). Keep it in step.
import numpy as np
WARPS=4; UNROLL=4; NEG=-np.inf

def rescale(m,mn):
    with np.errstate(invalid='ignore'):
        return np.where(m==NEG,0.0,np.exp(m-mn))

def split_block(q,kc,vc,h,split,splits,start,heads,kvh_,hd,window,V):
    kvh=h//(heads//kvh_); kvd=kvh_*hd
    vecs=hd//V; group=1
    while group<vecs: group<<=1
    per_warp=32//group
    lane=np.arange(32); slot=lane//group; gl=lane%group; has=gl<vecs
    first=max(0,start-window+1) if window>0 else 0
    share=(start-first+1+splits-1)//splits
    kbeg=first+split*share; kend=min(start+1,kbeg+share)
    step=WARPS*per_warp
    wm=np.zeros(WARPS); wl=np.zeros(WARPS); wacc=np.zeros((WARPS,hd))
    qv=np.zeros((32,V))
    for L in range(32):
        if has[L]: qv[L]=q[h*hd+gl[L]*V:h*hd+gl[L]*V+V]/np.sqrt(hd)
    for warp in range(WARPS):
        m=np.full(32,NEG); l=np.zeros(32); acc=np.zeros((32,V))
        base=kbeg+warp*per_warp
        while base<kend:
            k0=base+slot
            for u in range(UNROLL):
                key=k0+u*step
                kr=np.zeros((32,V)); vr=np.zeros((32,V))
                for L in range(32):
                    if has[L] and key[L]<kend:
                        c=kvh*hd+gl[L]*V
                        kr[L]=kc[key[L]*kvd+c:key[L]*kvd+c+V]; vr[L]=vc[key[L]*kvd+c:key[L]*kvd+c+V]
                s=(qv*kr).sum(1)
                o=group>>1
                while o>0: s=s+s[lane^o]; o>>=1
                ok=key<kend
                for L in range(32):
                    if ok[L]:
                        mn=max(m[L],s[L]); corr=rescale(m[L],mn); p=np.exp(s[L]-mn)
                        l[L]=l[L]*corr+p; acc[L]=acc[L]*corr+p*vr[L]; m[L]=mn
            base+=step*UNROLL
        o=group
        while o<32:
            mo=m[lane^o]; lo=l[lane^o]; ao=acc[lane^o]
            mn=np.maximum(m,mo); a=rescale(m,mn); b=rescale(mo,mn)
            acc=acc*a[:,None]+ao*b[:,None]; l=l*a+lo*b; m=mn
            o<<=1
        wm[warp]=m[0]; wl[warp]=l[0]
        for L in range(32):
            if slot[L]==0 and has[L]: wacc[warp,gl[L]*V:gl[L]*V+V]=acc[L]
    gm=wm.max(); gsum=(wl*rescale(wm,gm)).sum()
    v=(wacc*rescale(wm,gm)[:,None]).sum(0)
    return v,gm,gsum

def kernel(q,kc,vc,start,heads,kvh_,hd,window,V,capacity):
    w=min(capacity,window) if window>0 else capacity
    splits=min(max((w+127)//128,1),32)
    out=np.zeros(heads*hd)
    for h in range(heads):
        parts=[split_block(q,kc,vc,h,s,splits,start,heads,kvh_,hd,window,V) for s in range(splits)]
        if splits==1: v,gm,gsum=parts[0]; out[h*hd:(h+1)*hd]=v/gsum; continue
        ms=np.array([p[1] for p in parts]); gm=ms.max()
        wt=rescale(ms,gm); gsum=sum(p[2]*w_ for p,w_ in zip(parts,wt))
        out[h*hd:(h+1)*hd]=sum(p[0]*w_ for p,w_ in zip(parts,wt))/gsum
    return out,splits

def ref(q,kc,vc,start,heads,kvh_,hd,window):
    kvd=kvh_*hd; out=np.zeros(heads*hd)
    first=max(0,start-window+1) if window>0 else 0
    for h in range(heads):
        kvh=h//(heads//kvh_)
        K=kc.reshape(-1,kvd)[first:start+1,kvh*hd:(kvh+1)*hd]; Vv=vc.reshape(-1,kvd)[first:start+1,kvh*hd:(kvh+1)*hd]
        s=K@q[h*hd:(h+1)*hd]/np.sqrt(hd); p=np.exp(s-s.max()); p/=p.sum()
        out[h*hd:(h+1)*hd]=p@Vv
    return out

rng=np.random.default_rng(3)
cases=[  # start, heads, kv_heads, head_dim, window, elements per 16 bytes, capacity
    (150,2,1,128,0,4,151),      # f32: 32 lanes per key, 2 splits
    (700,2,2,128,0,8,1024),     # bf16: 16 lanes per key, 8 splits
    (20,2,1,64,0,8,4096),       # 32 splits, 11 of them empty
    (1000,2,1,48,300,8,1024),   # 6 of 8 lanes per key, window: keys 701..1000 in 3 splits
    (77,3,3,20,0,4,78),         # f32 head_dim 20: 5 of 8 lanes
    (5,2,2,8,0,8,6),            # one lane per key
]
for start,H,KVH,hd,window,V,cap in cases:
    kvd=KVH*hd
    q=rng.standard_normal(H*hd); kc=rng.standard_normal(cap*kvd); vc=rng.standard_normal(cap*kvd)
    got,splits=kernel(q,kc,vc,start,H,KVH,hd,window,V,cap)
    err=np.abs(got-ref(q,kc,vc,start,H,KVH,hd,window)).max()
    print(f"start {start:5d} heads {H}/{KVH} head_dim {hd:3d} window {window:3d} vec {V} splits {splits:2d}: max error {err:.1e}")
    assert err<1e-12, err
print("ok")
