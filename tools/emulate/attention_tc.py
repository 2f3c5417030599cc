# Emulates kernels/attention_tc.cu on the CPU, one lane's registers at a time, following the PTX fragment layouts
# of mma.m16n8k16 (A: a0 rows g / a1 g+8, columns 2t..2t+1; a2/a3 the same at columns +8; B: b0 rows 2t..2t+1,
# b1 +8, column g; C: c0c1 row g, c2c3 row g+8, columns 2t..2t+1) and ldmatrix .trans, and compares with a plain
# causal GQA attention. It checks the kernel's index arithmetic (tiles, masks, online softmax, fragment reuse)
# where no GPU is at hand; numerics (bf16 rounding) and cp.async ordering are checked by `DispNative selftest`.
# Run: python3 tools/emulate/attention_tc.py  (needs numpy). Keep it in step with the kernel.
import numpy as np
TC_WARPS=4; TC_M=64; TC_N=64
def mma(c, a, b0, b1):
    # c: [32][4], a: [32][4] pairs, b0/b1: [32] pairs. Reconstruct A(16x16), B(16x8), C(16x8) from fragments.
    A=np.zeros((16,16)); B=np.zeros((16,8)); C=np.zeros((16,8))
    for l in range(32):
        g,t=l>>2,l&3
        A[g,2*t:2*t+2]=a[l][0]; A[g+8,2*t:2*t+2]=a[l][1]; A[g,2*t+8:2*t+10]=a[l][2]; A[g+8,2*t+8:2*t+10]=a[l][3]
        B[2*t:2*t+2,g]=b0[l]; B[2*t+8:2*t+10,g]=b1[l]
        C[g,2*t:2*t+2]=c[l][0:2]; C[g+8,2*t:2*t+2]=c[l][2:4]
    D=C+A@B
    for l in range(32):
        g,t=l>>2,l&3
        c[l][0:2]=D[g,2*t:2*t+2]; c[l][2:4]=D[g+8,2*t:2*t+2]
def ldmatrix_x4_trans(smem, addr):   # addr[lane] = flat element index of a 8-element row
    r=[[None]*4 for _ in range(32)]
    for m in range(4):
        M=np.array([smem[addr[m*8+i]:addr[m*8+i]+8] for i in range(8)])
        for l in range(32):
            g,t=l>>2,l&3
            r[l][m]=np.array([M[2*t,g],M[2*t+1,g]])
    return r
def kernel(q,kc,vc,out,lse,tq,start,heads,kvh_,window,scale,D,gridx,bx,h):
    STRIDE=D+8; CHUNKS=D//8
    ks=np.full(TC_N*STRIDE,np.nan); vs=np.full(TC_N*STRIDE,np.nan)
    kvh=h//(heads//kvh_); q_dim=heads*D; kv_dim=kvh_*D
    q0=(gridx-1-bx)*TC_M
    block_last=start+min(tq,q0+TC_M)-1
    block_first=max(0,start+q0-window+1) if window>0 else 0
    W=[]
    for warp in range(TC_WARPS):
        warp_row=q0+warp*16
        st=dict(warp_row=warp_row, active=warp_row<tq, last=start+min(warp_row+15,tq-1),
                firstk=max(0,start+warp_row-window+1) if window>0 else 0, lanes=[])
        for lane in range(32):
            g,tg=lane>>2,lane&3
            row0=warp_row+g; row1=row0+8; pos0=start+row0; pos1=start+row1
            f0=max(0,pos0-window+1) if window>0 else 0; f1=max(0,pos1-window+1) if window>0 else 0
            qf=[]
            for k in range(D//16):
                c=k*16+2*tg
                def rd(row,c):
                    return q[row*q_dim+h*D+c:row*q_dim+h*D+c+2].copy() if row<tq else np.zeros(2)
                qf.append([rd(row0,c),rd(row1,c),rd(row0,c+8),rd(row1,c+8)])
            st['lanes'].append(dict(row0=row0,row1=row1,pos0=pos0,pos1=pos1,f0=f0,f1=f1,qf=qf,o=np.zeros((D//8,4)),m0=-np.inf,m1=-np.inf,l0=0.,l1=0.))
        W.append(st)
    def load(dst,src,tile):
        for i in range(TC_N*CHUNKS):
            j=i//CHUNKS; c=(i%CHUNKS)*8; key=tile+j
            ok=key<=block_last
            dst[j*STRIDE+c:j*STRIDE+c+8]=src[key*kv_dim+kvh*D+c:key*kv_dim+kvh*D+c+8] if ok else 0
    tile_begin=block_first-block_first%TC_N
    tile=tile_begin
    while tile<=block_last:
        load(ks,kc,tile); load(vs,vc,tile)
        for warp,st in enumerate(W):
            compute=st['active'] and tile<=st['last'] and tile+TC_N-1>=st['firstk']
            if not compute: continue
            L=st['lanes']
            s=[[np.zeros(4) for _ in range(TC_N//8)] for _ in range(32)]
            for k in range(D//16):
                for n in range(TC_N//8):
                    b0=[];b1=[]
                    for lane in range(32):
                        g,tg=lane>>2,lane&3
                        base=(n*8+g)*STRIDE+k*16+2*tg
                        b0.append(ks[base:base+2]); b1.append(ks[base+8:base+10])
                    cs=[s[l][n] for l in range(32)]
                    mma(cs,[L[l]['qf'][k] for l in range(32)],b0,b1)
            mx=[]
            for lane in range(32):
                x=L[lane]; tg=lane&3
                for n in range(TC_N//8):
                    for e in range(2):
                        key=tile+n*8+2*tg+e
                        s[lane][n][e]=s[lane][n][e]*scale if x['f0']<=key<=x['pos0'] else -np.inf
                        s[lane][n][2+e]=s[lane][n][2+e]*scale if x['f1']<=key<=x['pos1'] else -np.inf
                mx.append((max([x['m0']]+[s[lane][n][e] for n in range(TC_N//8) for e in range(2)]),
                           max([x['m1']]+[s[lane][n][2+e] for n in range(TC_N//8) for e in range(2)])))
            pf=[]
            for lane in range(32):
                x=L[lane]; qd=lane&~3
                mx0=max(mx[qd+i][0] for i in range(4)); mx1=max(mx[qd+i][1] for i in range(4))
                b0_=0 if mx0==-np.inf else mx0; b1_=0 if mx1==-np.inf else mx1
                c0=np.exp(x['m0']-b0_); c1=np.exp(x['m1']-b1_)
                S=s[lane]; su0=su1=0
                for n in range(TC_N//8):
                    S[n][0:2]=np.exp(S[n][0:2]-b0_); S[n][2:4]=np.exp(S[n][2:4]-b1_)
                    su0+=S[n][0]+S[n][1]; su1+=S[n][2]+S[n][3]
                x['l0']=x['l0']*c0+su0; x['l1']=x['l1']*c1+su1; x['m0']=mx0; x['m1']=mx1
                x['o'][:,0:2]*=c0; x['o'][:,2:4]*=c1
                pf.append([[S[2*k][0:2],S[2*k][2:4],S[2*k+1][0:2],S[2*k+1][2:4]] for k in range(TC_N//16)])
            for k in range(TC_N//16):
                for d in range(0,D//8,2):
                    addr=[(k*16+(lane&7)+((lane>>3)&1)*8)*STRIDE+d*8+(lane>>4)*8 for lane in range(32)]
                    b=ldmatrix_x4_trans(vs,addr)
                    od=[L[l]['o'][d] for l in range(32)]; mma(od,[pf[l][k] for l in range(32)],[b[l][0] for l in range(32)],[b[l][1] for l in range(32)])
                    od=[L[l]['o'][d+1] for l in range(32)]; mma(od,[pf[l][k] for l in range(32)],[b[l][2] for l in range(32)],[b[l][3] for l in range(32)])
        tile+=TC_N
    for st in W:
        if not st['active']: continue
        L=st['lanes']
        for lane in range(32):
            x=L[lane]; qd=lane&~3; tg=lane&3
            l0=sum(L[qd+i]['l0'] for i in range(4)); l1=sum(L[qd+i]['l1'] for i in range(4))
            i0=1/l0 if l0>0 else 0; i1=1/l1 if l1>0 else 0
            if tg==0:   # natural-log domain here (the kernel works in log2 and converts)
                if x['row0']<tq: lse[h*tq+x['row0']]=x['m0']+np.log(l0)
                if x['row1']<tq: lse[h*tq+x['row1']]=x['m1']+np.log(l1)
            for d in range(D//8):
                c=d*8+2*tg
                if x['row0']<tq: out[x['row0']*q_dim+h*D+c:x['row0']*q_dim+h*D+c+2]=x['o'][d][0:2]*i0
                if x['row1']<tq: out[x['row1']*q_dim+h*D+c:x['row1']*q_dim+h*D+c+2]=x['o'][d][2:4]*i1
def reference(q,k,v,tq,start,heads,kvh,D,window):
    out=np.zeros(tq*heads*D); lse=np.zeros(heads*tq)
    Q=q.reshape(tq,heads,D); K=k.reshape(-1,kvh,D); V=v.reshape(-1,kvh,D)
    for h in range(heads):
        kh=h//(heads//kvh)
        for t in range(tq):
            pos=start+t; f=max(0,pos-window+1) if window>0 else 0
            s=K[f:pos+1,kh]@Q[t,h]/np.sqrt(D); p=np.exp(s-s.max()); lse[h*tq+t]=s.max()+np.log(p.sum()); p/=p.sum()
            out[(t*heads+h)*D:(t*heads+h+1)*D]=p@V[f:pos+1,kh]
    return out,lse
rng=np.random.default_rng(1)
for (tq,start,heads,kvh,D,window) in [(70,0,2,1,64,0),(19,45,2,2,64,0),(130,3,1,1,128,0),(150,0,1,1,64,50)]:
    cap=start+tq+40
    q=rng.standard_normal(tq*heads*D); k=rng.standard_normal(cap*kvh*D); v=rng.standard_normal(cap*kvh*D)
    k[(start+tq)*kvh*D:]=np.nan; v[(start+tq)*kvh*D:]=np.nan   # unwritten cache
    out=np.full(tq*heads*D,np.nan); lse=np.full(heads*tq,np.nan)
    gridx=(tq+TC_M-1)//TC_M
    for h in range(heads):
        for bx in range(gridx): kernel(q,k,v,out,lse,tq,start,heads,kvh,window,1/np.sqrt(D),D,gridx,bx,h)
    ref,ref_lse=reference(q,k,v,tq,start,heads,kvh,D,window)
    print(tq,start,heads,kvh,D,window,"max err",np.nanmax(np.abs(out-ref)),"lse max err",np.nanmax(np.abs(lse-ref_lse)),
          "nan",np.isnan(out).sum()+np.isnan(lse).sum())
