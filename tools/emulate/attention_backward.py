# Emulates the training attention kernels of kernels/attention.cu on the CPU, warp by warp and lane by lane:
# attention_backward_dq (a warp per query row, tiles of 32 keys; also writes D = rowsum(dO*O)) and then
# attention_backward_dkv (a warp per key row, tiles of 32 queries, every head of the key's group), from the
# forward's log-sum-exp. Compares dq, dk, dv with the closed-form gradients of plain causal GQA attention, with and
# without a sliding window. It checks the kernels' index arithmetic (tiles, causal and window bounds, GQA groups);
# numerics and synchronisation are checked by `DispNative selftest` on a GPU.
# Run: python3 tools/emulate/attention_backward.py  (needs numpy). Keep it in step with the kernels.
import numpy as np
KEYS=32; W=8   # KEYS, PREFILL_WARPS

def ref(q,k,v,dout,H,KVH,hd,window):
    t=q.shape[0]; g=H//KVH; sc=1/np.sqrt(hd)
    dq=np.zeros_like(q); dk=np.zeros_like(k); dv=np.zeros_like(v); o=np.zeros_like(q); lse=np.zeros((H,t))
    for h in range(H):
        kh=h//g
        Q=q[:,h*hd:(h+1)*hd]; K=k[:,kh*hd:(kh+1)*hd]; V=v[:,kh*hd:(kh+1)*hd]; dO=dout[:,h*hd:(h+1)*hd]
        S=Q@K.T*sc
        for i in range(t):
            for j in range(t):
                if j>i or (window and j< i-window+1): S[i,j]=-np.inf
        m=S.max(1,keepdims=True); P=np.exp(S-m); l=P.sum(1,keepdims=True); P/=l
        O=P@V; o[:,h*hd:(h+1)*hd]=O; lse[h]=(m+np.log(l))[:,0]
        dP=dO@V.T; D=(dO*O).sum(1,keepdims=True); dS=P*(dP-D)
        dq[:,h*hd:(h+1)*hd]=dS@K*sc; dk[:,kh*hd:(kh+1)*hd]+=dS.T@Q*sc; dv[:,kh*hd:(kh+1)*hd]+=P.T@dO
    return o,lse,dq,dk,dv

def kern_dq(q,k,v,o,dout,lse,tq,heads,kvh_,hd,window,scale):
    qdim=heads*hd; kvdim=kvh_*hd
    dq=np.zeros((tq,qdim)); dsum=np.zeros((heads,tq))
    nb=(tq+W-1)//W
    for bx in range(nb):
        for h in range(heads):
            kvh=h//(heads//kvh_)
            t0=bx*W
            last_t=min(tq,t0+W)-1
            block_first=max(0,t0-window+1) if window>0 else 0
            for warp in range(W):
                t=t0+warp; active=t<tq
                if not active: continue
                first=max(0,t-window+1) if window>0 else 0
                qs=q[t,h*hd:(h+1)*hd]*scale; dos=dout[t,h*hd:(h+1)*hd]
                dd=(dos*o[t,h*hd:(h+1)*hd]).sum(); L=lse[h,t]; dsum[h,t]=dd
                acc=np.zeros(hd)
                tile=block_first-block_first%KEYS
                while tile<=last_t:
                    ks=np.zeros((KEYS,hd)); vs=np.zeros((KEYS,hd))
                    for j in range(KEYS):
                        key=tile+j
                        if key<=last_t: ks[j]=k[key,kvh*hd:(kvh+1)*hd]; vs[j]=v[key,kvh*hd:(kvh+1)*hd]
                    ds=np.zeros(KEYS)
                    for lane in range(KEYS):
                        key=tile+lane
                        if key>=first and key<=t:
                            s=(qs*ks[lane]).sum(); dp=(dos*vs[lane]).sum(); ds[lane]=np.exp(s-L)*(dp-dd)
                    for j in range(KEYS): acc+=ds[j]*ks[j]
                    tile+=KEYS
                dq[t,h*hd:(h+1)*hd]=acc*scale
    return dq,dsum

def kern_dkv(q,k,v,dout,lse,dsum,tq,heads,kvh_,hd,window,scale):
    qdim=heads*hd; kvdim=kvh_*hd; group=heads//kvh_
    dk=np.zeros((tq,kvdim)); dv=np.zeros((tq,kvdim))
    nb=(tq+W-1)//W
    for bx in range(nb):
        for kvh in range(kvh_):
            j0=bx*W; last_j=min(tq,j0+W)-1
            block_last=min(tq-1,last_j+window-1) if window>0 else tq-1
            gk=np.zeros((W,hd)); gv=np.zeros((W,hd))
            for h in range(kvh*group,(kvh+1)*group):
                tile=j0-j0%KEYS
                while tile<=block_last:
                    qs=np.zeros((KEYS,hd)); dos=np.zeros((KEYS,hd)); ls=np.zeros(KEYS); dr=np.zeros(KEYS)
                    for r in range(KEYS):
                        qi=tile+r
                        if qi<=block_last:
                            qs[r]=q[qi,h*hd:(h+1)*hd]*scale; dos[r]=dout[qi,h*hd:(h+1)*hd]; ls[r]=lse[h,qi]; dr[r]=dsum[h,qi]
                    for warp in range(W):
                        j=j0+warp
                        if j>=tq: continue
                        kr=k[j,kvh*hd:(kvh+1)*hd]; vr=v[j,kvh*hd:(kvh+1)*hd]
                        p=np.zeros(KEYS); ds=np.zeros(KEYS)
                        for lane in range(KEYS):
                            qi=tile+lane
                            if qi>=j and qi<=block_last and (window<=0 or qi<=j+window-1):
                                sc=(qs[lane]*kr).sum(); dp=(dos[lane]*vr).sum(); p[lane]=np.exp(sc-ls[lane]); ds[lane]=p[lane]*(dp-dr[lane])
                        for r in range(KEYS): gv[warp]+=p[r]*dos[r]; gk[warp]+=ds[r]*qs[r]
                    tile+=KEYS
            for warp in range(W):
                j=j0+warp
                if j<tq: dk[j,kvh*hd:(kvh+1)*hd]=gk[warp]; dv[j,kvh*hd:(kvh+1)*hd]=gv[warp]
    return dk,dv

rng=np.random.default_rng(0)
worst=0
for (t,H,KVH,hd,win) in [(45,4,2,16,0),(70,2,1,12,9),(40,3,3,8,0)]:
    q=rng.standard_normal((t,H*hd)); k=rng.standard_normal((t,KVH*hd)); v=rng.standard_normal((t,KVH*hd)); dout=rng.standard_normal((t,H*hd))
    o,lse,dq,dk,dv=ref(q,k,v,dout,H,KVH,hd,win)
    sc=1/np.sqrt(hd)
    gdq,dsum=kern_dq(q,k,v,o,dout,lse,t,H,KVH,hd,win,sc)
    gdk,gdv=kern_dkv(q,k,v,dout,lse,dsum,t,H,KVH,hd,win,sc)
    errs=[abs(g-w).max()/abs(w).max() for g,w in [(gdq,dq),(gdk,dk),(gdv,dv)]]
    worst=max(worst,*errs)
    print(f"t {t}, heads {H}/{KVH}, head_dim {hd}, window {win}: dq {errs[0]:.1e}, dk {errs[1]:.1e}, dv {errs[2]:.1e}")
print("ok" if worst<1e-10 else "MISMATCH")
raise SystemExit(0 if worst<1e-10 else 1)
